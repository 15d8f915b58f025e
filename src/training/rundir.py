"""The run directory (--proj_dir): one run at a time, one run per directory.

- A lock file (.lock: pid and host) held for the whole run; a lock whose process is gone is
  stale and removed, a live one refuses the second run.
- A directory that holds an earlier run is refused unless --resume (continue it) or --overwrite
  (delete the earlier run's files first): otherwise its log, plot and resume point would be
  overwritten and its adapters mixed with the new run's.
- run.json records what the adapters depend on (base shape, adapter settings, quantization),
  every option of the command and what they resolved to, and the step of the last resume point,
  so --resume can say what differs, or that the run is done.
- train.log (src/training/console.py) is appended to by the process that holds the lock only.
- Temporaries of a killed run (.tmp-* files, .resume-tmp) are removed at the start.
"""
import json
import os
import re
import shutil

from ..checkpoint import atomic_write, clean_stale_temporaries, release_pid_lock, take_pid_lock
from ..validate import check_fields, is_int, show

ADAPTER_NAME = re.compile(r"adapter-(\d{7})\.pth$")     # not adapter-STEP-merged.pth beside them
RUN_FILES = ("log.csv", "loss.png", "run.json", "train.log", "resume", "resume.old")
# run.json's fields: (required, what it must be, test); train.py writes settings and total_steps
# first (what --resume compares), then arguments (every option) and resolved (steps, model, data,
# versions), resume_step at each resume point. Runs of older versions lack the optional ones.
RUN_SCHEMA = {
    "settings": (True, "a dict of the run's settings", lambda v: isinstance(v, dict)),
    "total_steps": (True, "a positive whole number", lambda v: is_int(v, 1)),
    "resume_step": (False, "a whole number of steps", lambda v: is_int(v, 0)),
    "arguments": (False, "a dict of the command's options", lambda v: isinstance(v, dict)),
    "resolved": (False, "a dict of what the run resolved", lambda v: isinstance(v, dict)),
}


def run_adapters(proj_dir):
    """The adapter files a run wrote in proj_dir, oldest step first."""
    names = [n for n in os.listdir(proj_dir) if ADAPTER_NAME.match(n)] if os.path.isdir(proj_dir) else []
    return [os.path.join(proj_dir, n) for n in sorted(names, key=lambda n: int(ADAPTER_NAME.match(n).group(1)))]


def check_writable(proj_dir):
    """proj_dir exists (or is made) as a directory this process can write, or one sentence."""
    if os.path.exists(proj_dir) and not os.path.isdir(proj_dir):
        raise ValueError(f"--proj_dir {proj_dir} is a file, not a directory: give a directory for the run's files.")
    try:
        os.makedirs(proj_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--proj_dir {proj_dir} cannot be made ({e.strerror}): choose a directory you can write.") from None
    if not os.access(proj_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--proj_dir {proj_dir} is not writable: choose a directory you can write.")


class RunDir:
    def __init__(self, proj_dir):
        self.proj_dir = proj_dir
        self.lock_path = os.path.join(proj_dir, ".lock")
        self.json_path = os.path.join(proj_dir, "run.json")
        self.locked = False
        self.made = False       # train.py: whether this run made proj_dir (its start line says so)

    def lock(self, say=print):
        owner = take_pid_lock(self.lock_path, say=say)
        if owner is not None:
            who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
            raise ValueError(f"Another run ({who}) is using {self.proj_dir}: wait for it, or choose another "
                             f"--proj_dir (if no run is going on, delete {self.lock_path}).")
        self.locked = True

    def unlock(self):
        if self.locked:
            release_pid_lock(self.lock_path)
        self.locked = False

    def earlier_run(self):
        """The names of an earlier run's files in proj_dir (empty when there is none)."""
        found = [n for n in RUN_FILES if os.path.exists(os.path.join(self.proj_dir, n))]
        adapters = run_adapters(self.proj_dir)
        return found + ([f"{len(adapters)} adapter files"] if adapters else [])

    def prepare(self, resume, overwrite, say=print):
        """Before any work: refuse a directory with another run unless resuming or overwriting;
        remove a killed run's temporaries (under the lock, so no live writer is touched)."""
        earlier = self.earlier_run()
        if resume and overwrite:
            raise ValueError("--resume continues the run in --proj_dir and --overwrite deletes it: give one of them.")
        if earlier and not (resume or overwrite):
            raise ValueError(f"--proj_dir {self.proj_dir} holds an earlier run ({', '.join(earlier)}): continue it "
                             "with --resume, choose another --proj_dir, or pass --overwrite to delete it and start anew.")
        clean_stale_temporaries(self.proj_dir, say=say)
        shutil.rmtree(os.path.join(self.proj_dir, ".resume-tmp"), ignore_errors=True)
        if overwrite and earlier:
            for path in [os.path.join(self.proj_dir, n) for n in RUN_FILES] + run_adapters(self.proj_dir):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            say(f"--overwrite: deleted the earlier run in {self.proj_dir} ({', '.join(earlier)})")

    def recorded(self):
        """run.json's fields, each checked by type (one sentence naming the field otherwise), or None."""
        try:
            with open(self.json_path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            reason = getattr(e, "msg", None) or getattr(e, "reason", None) or type(e).__name__
            raise ValueError(f"{self.json_path} cannot be read ({reason}): the run directory is damaged.") from None
        damaged = "the run directory is damaged (--overwrite starts anew)"
        check_fields(data, RUN_SCHEMA, ValueError, f"{self.json_path} is a run record", damaged)
        odd = [k for k in data["settings"] if not isinstance(k, str)]
        if odd:
            raise ValueError(f"{self.json_path} records a setting named {show(odd[0])}: {damaged}.")
        return data

    def record(self, **fields):
        data = {**(self.recorded() or {}), **fields}
        atomic_write(self.json_path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def check_resume_point(path):
    """A resume point as Lightning (DeepSpeed: a folder; other strategies: one file) wrote it,
    complete and undamaged (every .pt a zip whose members pass their CRC), or one sentence."""
    import zipfile

    def damaged(why):
        return ValueError(f"--resume: the resume point {path} is damaged ({why}): restore it, or start anew with "
                          "--overwrite.")

    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "latest"), "rb") as f:
                tag = f.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise damaged("its latest file is missing or unreadable") from None
        folder = os.path.join(path, tag)
        if not tag or os.sep in tag or not os.path.isdir(folder):
            raise damaged(f"its latest file names {show(tag)}, which is not a folder in it")
        names = sorted(os.listdir(folder))
        if "mp_rank_00_model_states.pt" not in names or not any(n.endswith("optim_states.pt") for n in names):
            raise damaged("the model or optimizer state is missing")
        files = [os.path.join(folder, n) for n in names if n.endswith(".pt")]
    else:
        files = [path]
    for file in files:
        try:
            with zipfile.ZipFile(file) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as e:
            raise damaged(f"{os.path.basename(file)} is not a complete PyTorch file: {type(e).__name__}") from None
        if bad is not None:
            raise damaged(f"{os.path.basename(file)} fails its checksum in {bad}")


def resume_point_step(proj_dir):
    """The step the resume point in proj_dir holds, read from the point itself (run.json records it
    just after the point is swapped in, so a kill between the two leaves the record behind), or None."""
    import torch
    for name in ("resume", "resume.old"):
        path = os.path.join(proj_dir, name)
        try:
            if os.path.isdir(path):
                with open(os.path.join(path, "latest")) as f:
                    path = os.path.join(path, f.read().strip(), "mp_rank_00_model_states.pt")
            if os.path.isfile(path):
                return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:       # damaged or another layout: --resume says what is wrong with it
            continue
    return None


def differences(recorded, now):
    """Sentences naming what differs between the settings a run recorded and this command's."""
    out = []
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                k = changed[0]
                out.append(f"{key} of {k}: {a.get(k)} then, {b.get(k)} now" + (f" (and {len(changed) - 1} more)"
                                                                                if len(changed) > 1 else ""))
            else:
                out.append(f"{key}: {a} then, {b} now")
    return out


def run_state(proj_dir):
    """(state, step) of the run in proj_dir, for scripts/run_bone.sh's demo: ("none", 0) when it
    holds none, ("resumable", step) when it stopped before its last step with a resume point,
    ("finished", step), or ("stopped", 0): an earlier run with no resume point to continue from."""
    run_dir = RunDir(proj_dir)
    if not run_dir.earlier_run():
        return "none", 0
    try:
        recorded = run_dir.recorded() or {}
    except ValueError:      # a damaged run.json: nothing to resume from
        return "stopped", 0
    step = resume_point_step(proj_dir) or recorded.get("resume_step", 0)
    if "total_steps" in recorded and step >= recorded["total_steps"]:
        return "finished", step
    if step and any(os.path.exists(os.path.join(proj_dir, n)) for n in ("resume", "resume.old")):
        return "resumable", step
    return "stopped", 0


if __name__ == "__main__":     # python -m src.training.rundir PROJ_DIR: "STATE STEP" (scripts/run_bone.sh)
    import sys
    print(*run_state(sys.argv[1]))
