"""gdro.py's plumbing: what a reader of the method need not see, kept here so that gdro.py reads as the method.

  processes   torchrun's ranks (one process per GPU), a refused input (BadInput: one line, exit code 2)
  files       crash-safe writes (a kill leaves the old file or the new one), one run per folder (a lock), SHA-256
              records that prove a checkpoint or LoRA folder whole, Ctrl-C / SIGTERM that finish the work in flight
  inputs      the prompt file and an image folder (--from-images), each line checked, one line naming the fault
  the cache   one safetensors shard per prompt, written whole, its tensors' SHA-256 in its header
  checkpoints the LoRA in diffusers' format, the optimizer state, resume
  the run     --out's checks, --resume's comparison with config.json

Exit codes, for every stop: 2 = a refused input (checked before anything heavy, nothing written; also a folder in use
by another run, or a damaged checkpoint), 1 = a failure while running, or a Ctrl-C, SIGTERM or SIGUSR1 in the cache
build or training: one line saying what to do, finished work kept; 130 = a Ctrl-C anywhere else (nothing
half-written); 0 = done.
"""
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load as safetensors_load, load_file, save as safetensors_bytes
from tqdm import tqdm

# ============================================================================= processes


class BadInput(SystemExit):
    """A refused input: one line on stderr naming the flag, file or line, exit code 2 (argparse's convention)."""
    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def init_distributed():
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain `python gdro.py` is one process. NCCL on CUDA, gloo on
    CPU. Returns this process's device."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process():
    return rank_and_world()[0] == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ============================================================================= files


def write_failed(path, e):
    """The one-line stop for a write that failed (a full disk, permissions): what happened and what to do."""
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror)
    return SystemExit(f"error: cannot write {path}: {what}. Free space or fix the folder, then rerun the same "
                      "command: finished cache shards and the last complete checkpoint are kept")


def write_atomic(path, data):
    """Write bytes to path so that a kill at any moment leaves the old file or the new one, never a torn one; a
    full disk or a permission problem stops the run with one line (what was already written stays usable)."""
    path, tmp = Path(path), Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, e)


def append_line(path, line):
    """Append one line to a log (metrics.jsonl): a kill can tear only that last line, which a resume drops."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise write_failed(path, e)


HELD_LOCKS = {}  # OUT -> its open lock file, held for the life of the process


def lock_out(out, create=True):
    """One run per --out: an exclusive flock on OUT/.lock, taken before anything else is written there (create=False:
    only if OUT exists, so that a refused input writes nothing). The kernel drops it when the process ends, however
    it ends, so a killed run leaves no stale lock. Under torchrun rank 0 holds it for the job and tells the others."""
    holder, key = None, str(Path(out).resolve())
    if is_main_process() and key not in HELD_LOCKS and (create or Path(out).is_dir()):
        Path(out).mkdir(parents=True, exist_ok=True)
        f = open(Path(out) / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
        else:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            HELD_LOCKS[key] = f
    if dist.is_initialized():
        shared = [holder]
        dist.broadcast_object_list(shared, src=0)
        holder = shared[0]
    if holder is not None:
        raise BadInput(f"--out {out} is in use by another run (PID {holder}); wait for it to end, or use another --out")


SHA256_FILE = "sha256.json"  # in a checkpoint or LoRA folder: the SHA-256 of its other files, written last


def record_sha256(folder):
    hashes = {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
              if p.is_file() and p.name != SHA256_FILE and not p.name.startswith(".")}
    write_atomic(Path(folder) / SHA256_FILE, json.dumps(hashes, indent=2).encode())


def damaged_file(folder, names):
    """The first file of `names` in folder that is not what sha256.json recorded, or None (all whole, or a folder
    saved before such records)."""
    record = Path(folder) / SHA256_FILE
    if not record.is_file():
        return None
    try:
        hashes = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return record
    for name in names:
        path = Path(folder) / name
        if name in hashes and (not path.is_file() or file_sha256(path) != hashes[name]):
            return path
    return None


STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])


@contextlib.contextmanager
def stop_when_done(doing):
    """Within the block a first Ctrl-C, SIGTERM (a cluster's preemption, torchrun's shutdown) or SIGUSR1 (SLURM's
    early warning) only marks the yielded list: the caller finishes what it is `doing`, saves and stops. A second
    signal raises KeyboardInterrupt at once. (Python catches signals in its main thread only; elsewhere they keep
    their usual meaning.)"""
    stop = []

    def handler(signum, _):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        if is_main_process():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: {doing}, then stopping (Ctrl-C again to stop at once)", file=sys.stderr)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ============================================================================= input files
# the prompt file and an image folder (--from-images): every line checked before any model loads; --tiny's defaults


def shrink_if_tiny(args, argv, tiny_settings):
    """--tiny shrinks the run for CPU and says what it shrank; every flag given explicitly still wins."""
    if args.tiny:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        shrunk = {k: v for k, v in tiny_settings.items() if "--" + k.replace("_", "-") not in given}
        vars(args).update(shrunk)
        if shrunk and os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
            print("--tiny: " + ", ".join(f"{k}={v}" for k, v in shrunk.items()))
    return args


def read_prompts(path, reward, max_prompts=None):
    """Non-blank lines of the prompt file. With the OCR reward every prompt needs a quoted target."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"--prompts {path} is a folder; expected a text file with one prompt per line")
    if not path.is_file():
        raise BadInput(f"--prompts {path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"--prompts {path}: cannot read it ({e.strerror})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BadInput(f"--prompts {path} is not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8")
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise BadInput(f"--prompts {path} is binary, not text (line {line} holds a NUL byte)")
    lines = [(i, s.strip()) for i, s in enumerate(text.lstrip("\ufeff").splitlines(), 1) if s.strip()][:max_prompts]
    if not lines:
        raise BadInput(f"--prompts {path} has no prompts")
    if reward == "ocr":
        from reward_ocr import ocr_target
        bad = []
        for i, prompt in lines:
            try:
                ocr_target(prompt)
            except ValueError:
                bad.append(str(i))
        if bad:
            raise BadInput(f"--prompts {path}: line(s) {', '.join(bad[:20])} have no quoted text for the OCR reward")
    return [prompt for _, prompt in lines]


def read_image_folder(folder, group_size):
    """DIR/metadata.jsonl (Hugging Face "imagefolder": one JSON object per image with file_name, prompt, reward) ->
    (prompts, groups): the images of each prompt, in order of first appearance, as [(file, reward)]. Every line and
    every image is checked here, before any model loads; prompts with fewer than k images are skipped."""
    from PIL import Image
    folder, groups = Path(folder), {}
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise BadInput(f"--from-images: {meta} not found (one JSON line per image: file_name, prompt, reward)")
    for n, line in enumerate(meta.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file, prompt, reward = folder / row["file_name"], row["prompt"], float(row["reward"])
            assert isinstance(prompt, str) and prompt.strip(), "prompt must be a non-empty string"
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
            raise BadInput(f"{meta} line {n}: malformed ({type(e).__name__}: {e}); expected "
                           '{"file_name": ..., "prompt": ..., "reward": <number>}')
        if not math.isfinite(reward):
            raise BadInput(f"{meta} line {n}: the reward {reward} is not a finite number")
        try:
            with Image.open(file) as im:
                im.verify()
        except Exception as e:
            raise BadInput(f"{meta} line {n}: cannot read image {file} ({type(e).__name__})")
        groups.setdefault(prompt.strip(), []).append((file, reward))
    small = [p for p, g in groups.items() if len(g) < group_size]
    if small and is_main_process():
        print(f"--from-images: skipped {len(small)} of {len(groups)} prompts with fewer than --group-size "
              f"{group_size} images")
    groups = {p: g for p, g in groups.items() if len(g) >= group_size}
    if not groups:
        raise BadInput(f"--from-images: no prompt in {meta} has --group-size {group_size} images or more")
    return list(groups), list(groups.values())


# ============================================================================= the cache
# OUT/cache/manifest.json says how the cache was made; OUT/cache/prompt_NNNNNN.safetensors holds one prompt's group:
# x0 [n, ...] (clean latents), rewards [n], seeds [n] (or the image files), and its text conditioning. Every file is
# written under a temporary name and renamed, so a kill leaves whole shards only and a rerun resumes at the first
# missing one, on any number of processes.


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_path(cache_dir, i):
    return Path(cache_dir) / f"prompt_{i:06d}.safetensors"


def tensor_bytes(data):
    """The tensors' part of a safetensors file's bytes (after its 8-byte length and JSON header)."""
    return data[8 + int.from_bytes(data[:8], "little"):]


def write_shard(cache_dir, i, prompt, tensors, **metadata):
    """The shard's header records its prompt, and the SHA-256 of its tensors that read_shard checks."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"prompt": prompt, **metadata}
    metadata["sha256"] = hashlib.sha256(tensor_bytes(safetensors_bytes(tensors, metadata=metadata))).hexdigest()
    write_atomic(shard_path(cache_dir, i), safetensors_bytes(tensors, metadata=metadata))


def read_shard(cache_dir, i):
    """One prompt's group: {x0, rewards, prompt_embeds, ...} as CPU tensors, checked against its recorded SHA-256."""
    path = shard_path(cache_dir, i)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")  # a readable header: check_cache read it before training
    recorded = json.loads(data[8:header_end]).get("__metadata__", {}).get("sha256")
    if recorded and hashlib.sha256(data[header_end:]).hexdigest() != recorded:
        raise SystemExit(f"error: cache shard {path} is damaged (its tensors differ from the SHA-256 written with "
                         "them); delete it and rerun the same command (with --resume once training has started) to "
                         "regenerate it")
    return safetensors_load(data)


def check_cache(cache_dir, prompts):
    """Every shard's header: its group size (rewards are tiny, read them) and its prompt. Returns [P] group sizes and
    the mean reward. A shard that is unreadable or made for another prompt file stops the run, saying what to do."""
    sizes, total = [], 0.0
    quiet = len(prompts) < 1000 or not is_main_process()
    for i, prompt in enumerate(tqdm(prompts, desc="check cache", unit="shard", disable=quiet)):
        path = shard_path(cache_dir, i)
        try:
            with safe_open(path, "pt") as f:
                found, rewards = f.metadata().get("prompt"), f.get_tensor("rewards")
        except Exception as e:
            raise SystemExit(f"error: cache shard {path} is unreadable ({str(e).splitlines()[0]}); delete it and rerun "
                             "the same command to regenerate it")
        if found != prompt:
            raise SystemExit(f"error: cache shard {path} holds prompt {found!r} but line {i + 1} of the prompts is "
                             f"{prompt!r}; use another --out or delete {cache_dir}")
        sizes.append(len(rewards))
        total += float(rewards.sum())
    return sizes, total / sum(sizes)


def check_manifest(cache_dir, manifest):
    """Refuse a cache whose shards were made another way; a cache without shards (say, a failed first run's)
    takes the new manifest."""
    path = Path(cache_dir) / "manifest.json"
    if not path.exists() or not any(Path(cache_dir).glob("prompt_*.safetensors")):
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"unreadable cache manifest {path}: {e}")
    diff = [f"{k}={found.get(k)!r} (now {v!r})" for k, v in manifest.items() if found.get(k) != v]
    if diff:
        raise BadInput(f"the cache in {cache_dir} was built with {', '.join(diff)}; use another --out, or delete "
                       f"{cache_dir} to rebuild it")


def my_missing_shards(cache_dir, n_prompts):
    """The prompts without a shard that this process makes: all of them, or under torchrun every N-th. Every
    process lists them before any writes one, so the lists agree, whatever was finished by an earlier run."""
    barrier()
    missing = [i for i in range(n_prompts) if not shard_path(cache_dir, i).exists()]
    rank, world = rank_and_world()
    return missing[rank::world]


def cache_interrupted(cache_dir, prompts):
    done = sum(shard_path(cache_dir, i).exists() for i in range(len(prompts)))
    return SystemExit(f"interrupted; {done} of {len(prompts)} prompts are cached; rerun the same command to continue")


# ============================================================================= checkpoints


LORA_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' pipe.load_lora_weights(folder) reads


def save_lora(pipeline_class, transformer, folder):
    """folder/pytorch_lora_weights.safetensors in diffusers' format (pipe.load_lora_weights(folder) reads it), and
    folder/sha256.json."""
    from peft.utils import get_peft_model_state_dict
    Path(folder).mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     weight_name=LORA_FILE, save_function=lambda weights, path: write_atomic(
                                         path, safetensors_bytes(weights, metadata={"format": "pt"})))
    record_sha256(folder)


def save_checkpoint(ckpt_dir, step, pipeline_class, transformer, optimizer):
    """OUT/checkpoints/step_NNNNNN/: the LoRA (diffusers format), state.pt (step, optimizer) and, last, sha256.json.
    Written whole into a temporary folder, renamed into place, and only then do checkpoints older than the two newest
    give up their state.pt (they keep their LoRA for eval's trend): a kill at any moment leaves a complete checkpoint
    to resume from, and a damaged newest one (sha256.json says which) leaves the one before."""
    final, tmp = Path(ckpt_dir) / f"step_{step:06d}", Path(ckpt_dir) / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(pipeline_class, transformer, tmp)
    state = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, state)
    write_atomic(tmp / "state.pt", state.getvalue())
    record_sha256(tmp)
    if final.exists():  # a LoRA-only leftover of an earlier run at this step
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(Path(ckpt_dir).glob("step_*/state.pt"))[:-2]:
        if old.parent != final:
            old.unlink()
    return final


def complete_checkpoints(ckpt_dir):
    """The checkpoints that can be resumed from (LoRA + state.pt), oldest first."""
    return [d for d in sorted(Path(ckpt_dir).glob("step_*"))
            if (d / "state.pt").is_file() and (d / LORA_FILE).is_file()]


def newest_checkpoint(ckpt_dir):
    return (complete_checkpoints(ckpt_dir) or [None])[-1]


def load_checkpoint(ckpt, transformer, optimizer):
    from peft.utils import set_peft_model_state_dict
    lora = {k.removeprefix("transformer."): v for k, v in load_file(ckpt / LORA_FILE).items()}
    set_peft_model_state_dict(transformer, lora)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def read_metrics(path, up_to_step):
    """The lines of metrics.jsonl up to a step; a torn last line (a kill mid-write) is dropped."""
    kept = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= up_to_step:
                kept.append(line)
    return kept


# ============================================================================= the run folder


def check_out(out):
    """--out must be a folder we can write into (it may not exist yet)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir():
        raise BadInput(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {parent} is not a writable folder")


def check_run_state(args, out):
    """A run already in OUT continues only with --resume; --resume needs a whole checkpoint to resume."""
    found = complete_checkpoints(out / "checkpoints")
    if args.resume and not found:
        raise BadInput(f"--resume: {out / 'checkpoints'} holds no complete checkpoint; drop --resume to start "
                       "training (a finished cache is reused either way)")
    if not args.resume and found:
        raise BadInput(f"{out / 'checkpoints'} holds a run (newest {found[-1].name}); continue it with --resume, or "
                       "use another --out")
    damaged = found and damaged_file(found[-1], [LORA_FILE, "state.pt"])
    if damaged:
        then = (f"with --resume to continue from {found[-2].name}" if len(found) > 1 else
                "without --resume to train from the start (the cache is kept)")
        raise BadInput(f"checkpoint file {damaged} is damaged (not what its {SHA256_FILE} recorded when it was "
                       f"saved); delete {found[-1]} and rerun {then}")


# config.json records every setting; these do not shape what is learned (how long, how often to log and save, how
# fast), and these cannot change on --resume (the checkpoint is of that model's layers)
NOT_SHAPING = {"out", "resume", "max_steps", "log_every", "save_every", "dry_run", "compile", "rollout_batch",
               "grad_checkpointing"}


CANNOT_CHANGE = {"model", "tiny", "family", "resolution", "lora_rank"}


def run_config(args, out, world):
    """config.json: this run's settings; on --resume the first run's, plus this resume (its step and changes) in
    "resumes". A changed setting is listed in one line, since the run is then not what an uninterrupted one would
    have been; a change of model, family, resolution or LoRA rank is refused."""
    config, path = {**vars(args), "world_size": world}, out / "config.json"
    if not args.resume or not path.is_file():
        return config
    try:
        first = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"--resume: unreadable {path} ({e}); it records the first run's settings")
    changes = {k: [first.get(k), v] for k, v in config.items() if k not in NOT_SHAPING and first.get(k) != v}
    listed = ", ".join(f"{'--' + k.replace('_', '-') if k in vars(args) else k} {a} -> {b}"
                       for k, (a, b) in changes.items())
    if changes.keys() & CANNOT_CHANGE:
        raise BadInput(f"--resume with {listed}: a checkpoint cannot continue on another model, family, resolution or "
                       f"LoRA rank; resume with the first run's settings ({path}), or use another --out")
    if changes and is_main_process():
        print(f"--resume with changed settings: {listed}; the run is no longer what an uninterrupted one would be")
    step = int(newest_checkpoint(out / "checkpoints").name.removeprefix("step_"))
    return {**first, "resumes": first.get("resumes", []) + [{"step": step, "changes": changes}]}
