"""A hostile corpus: folders, run folders and flags that a careless user or an attacker could hand tlearn, each
with what tlearn must do about it.

Every case runs the real command in a child process, with a time limit (60 s) and a memory limit (6 GB of address
space), and must end with exit 0 (handled) or exit 2 and one line (refused), never a traceback, and must leave
the user's files (everything under ``user/``) exactly as they were. Some cases check more: the run written, the
cells of a CSV, the bytes printed.

    python tests/hostile_corpus.py        # runs them all and prints how many hold, by kind

``tests/test_hostile.py`` runs the same cases under pytest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import make_folder

TIME_LIMIT = 60  # seconds per command
MEMORY_LIMIT = 6 << 30  # bytes of address space per command
TINY = ["--backbone", "test_efficientnet", "--no-pretrained"]
FEATURES = [*TINY, "--mode", "features", "--head", "logreg"]
ESCAPE = "\x1b]0;pwned\x07\x1b[31mred"  # retitles and recolours a terminal


@dataclass
class Result:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float


@dataclass
class Case:
    kind: str  # hang, traceback, silently-wrong, lost-data, injection, small, beyond
    name: str
    argv: Callable[[World], list[str]]
    expect: int  # 0: handled, 2: refused with one line
    check: Callable[[World, Result], str | None] | None = None  # anything else that must hold: a problem, or None


@dataclass
class World:
    root: Path
    cases: dict[str, Path] = field(default_factory=dict)

    @property
    def user(self) -> Path:
        return self.root / "user"

    @property
    def data(self) -> Path:
        return self.user / "photos"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def out(self, name: str) -> Path:
        return self.root / "out" / name

    def image(self) -> Path:
        return next((self.data / "blue").iterdir())


def tlearn(world: World, argv: list[str], umask: int = 0o022, timeout: float = TIME_LIMIT) -> Result:
    """``tlearn ARGV`` in a child process, with the corpus's limits."""
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        os.umask(umask)

    env = {**os.environ, "TLEARN_CACHE_DIR": str(world.root / "cache"), "HOME": str(world.root / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "tlearn.cli", *argv], capture_output=True, timeout=timeout,
                           cwd=world.root / "cwd", env=env, preexec_fn=limits, stdin=subprocess.DEVNULL)
        return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - start)
    except subprocess.TimeoutExpired as e:
        return Result(-1, e.stdout or b"", (e.stderr or b"") + b"\n[timed out]", time.monotonic() - start)


# --- the world: a data folder, a trained run, and variants of both ----------------------------------------


def build_world(root: Path) -> World:
    """The user's folders, one trained run, and every hostile variant the cases use."""
    world = World(root)
    for d in ("cwd", "home", "out"):
        (root / d).mkdir(parents=True, exist_ok=True)
    make_folder(world.data, per_class=8)
    trained = tlearn(world, ["train", str(world.data), *FEATURES, "--out", str(world.run)])
    if trained.rc != 0:
        raise RuntimeError(f"the corpus's run could not be trained: {trained.stderr.decode()[-2000:]}")
    u = world.user

    fifo = copy_data(world, u / "with-fifo")
    os.mkfifo(fifo / "blue" / "x.jpg")
    zero = copy_data(world, u / "with-dev-zero")
    (zero / "red" / "z.jpg").symlink_to("/dev/zero")
    odd = copy_data(world, u / "odd-entries")
    (odd / "blue" / "broken.jpg").symlink_to(odd / "blue" / "missing.jpg")
    (odd / "blue" / "loop.jpg").symlink_to(odd / "blue" / "loop.jpg")
    (odd / "red" / "folder.jpg").mkdir()
    (odd / "red" / "empty.png").write_bytes(b"")
    shutil.copy(world.image(), odd / "red" / "new\nline.png")
    shutil.copy(world.image(), os.fsencode(odd / "red") + b"/latin1-\xe9.png")
    os.mkfifo(u / "manifest-fifo.csv")
    os.mkfifo(u / "weights-fifo.safetensors")

    formula = u / "formulas"
    for old, new in (("blue", '=HYPERLINK("http://example.com","click")'), ("red", "@SUM(1+1)")):
        shutil.copytree(world.data / old, formula / new)
    escaped = u / "escapes"
    shutil.copytree(world.data / "blue", escaped / ESCAPE)
    shutil.copytree(world.data / "red", escaped / "plain")

    notes = u / "notes"  # a folder of the user's own files that happen to have run-like names
    notes.mkdir()
    for name in ("report.html", "config.json", "history.csv"):
        (notes / name).write_text(f"my own {name}, not tlearn's\n")
    Image.new("1", (10_000, 9_000)).save(u / "bomb.png")

    mine = world.out("overwrite-me")
    mine.mkdir()
    (mine / "mine.txt").write_text("keep me\n")
    (mine / "report.html").write_text("an old page\n")
    stale = world.out("stale")
    shutil.copytree(world.run, stale)
    (stale / ".model.safetensors.k1ll3d.tmp").write_bytes(b"half a model")
    (root / "a-file").write_text("not a folder\n")

    edits: dict[str, Callable[[dict], None]] = {
        "decision": lambda c: c.__setitem__("decision", {"evil": 1}),
        "dropout": lambda c: c["model"].__setitem__("dropout", 5.0),
        "format-version": lambda c: c.__setitem__("format_version", "2"),
        "model-section": lambda c: c.__setitem__("model", "x"),
        "hidden": lambda c: c["model"].__setitem__("hidden", -5),
        "num-features-text": lambda c: c["model"].__setitem__("num_features", "1280"),
        "scratch-arch": lambda c: c["model"].update(kind="scratch", arch="no-such-net"),
        "huge-widths": lambda c: c["model"].update(num_features=1_000_000, hidden=1_000_000),
        "classes-3m": lambda c: c["model"].__setitem__("classes", [f"c{i}" for i in range(3_000_000)]),
        "counts": lambda c: c["data_summary"].__setitem__("counts", {"train": {"cat": 1, "dog": 1}}),
        "classes-escape": rename_classes,
        "deep-json": lambda c: c.__setitem__("measured", _Raw("[" * 50_000 + "]" * 50_000)),
        "novelty-rows": lambda c: c["model"]["novelty"].__setitem__("rows", 7),
        "novelty-scale": lambda c: c["model"]["novelty"].__setitem__("scale", [0, -1]),
        "novelty-kind": lambda c: c["model"]["novelty"].__setitem__("kind", "from the future"),
    }
    for name, edit in edits.items():
        world.cases[name] = edited_run(world, name, edit)
    world.cases["int64"] = edited_run(world, "int64", lambda c: None, dtype=np.int64)
    mixed = world.root / "runs" / "mixed"
    shutil.copytree(world.run, mixed)
    config = json.loads((mixed / "config.json").read_text())
    config["model"]["classes"] = ["cat", "dog"]
    (mixed / "config.json").write_text(json.dumps(config))  # killed between the model and config.json
    world.cases["mixed"] = mixed
    fifo_config = world.root / "runs" / "fifo-config"
    shutil.copytree(world.run, fifo_config)
    (fifo_config / "config.json").unlink()
    os.mkfifo(fifo_config / "config.json")
    world.cases["fifo-config"] = fifo_config
    zero_model = world.root / "runs" / "zero-model"
    shutil.copytree(world.run, zero_model)
    (zero_model / "model.safetensors").unlink()
    (zero_model / "model.safetensors").symlink_to("/dev/zero")
    world.cases["zero-model"] = zero_model
    for name, state in (("no-metadata", None), ("no-history", {"stage": "frozen", "epoch": 1})):
        folder = world.root / "runs" / name
        folder.mkdir(parents=True)
        shutil.copy(world.run / "split.csv", folder / "split.csv")
        from safetensors.numpy import save_file

        save_file({"model.w": np.zeros(2, np.float32)}, str(folder / "checkpoint.safetensors"),
                  metadata=None if state is None else {"format": "tlearn-checkpoint", "state": json.dumps(state)})
        world.cases[name] = folder
    return world


def rename_classes(config: dict) -> None:
    """The classes renamed to a terminal escape sequence and "plain", everywhere the config names them."""
    names = dict(zip(config["model"]["classes"], [ESCAPE, "plain"], strict=True))
    config["model"]["classes"] = list(names.values())
    counts = config["data_summary"]["counts"]
    config["data_summary"]["counts"] = {s: {names[k]: n for k, n in per.items()} for s, per in counts.items()}


class _Raw(str):
    """Text spliced into JSON as it is (see ``edited_run``)."""


def copy_data(world: World, dest: Path) -> Path:
    shutil.copytree(world.data, dest)
    return dest


def edited_run(world: World, name: str, edit: Callable[[dict], None], dtype: type | None = None) -> Path:
    """A copy of the trained run whose config (in config.json and inside model.safetensors) went through
    ``edit``, and whose tensors were cast to ``dtype``."""
    from safetensors.numpy import load_file, save_file

    folder = world.root / "runs" / name
    shutil.copytree(world.run, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    raw = next((v for v in config.values() if isinstance(v, _Raw)), None)
    text = json.dumps({k: v for k, v in config.items() if not isinstance(v, _Raw)})
    if raw is not None:
        text = text[:-1] + ', "measured": ' + raw + "}"
    tensors = load_file(str(folder / "model.safetensors"))
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "tlearn-model", "config": text})
    (folder / "config.json").write_text(text)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a regular file by its content, anything else by its kind and target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[str(path)] = "link to " + os.readlink(path)
            else:
                out[str(path)] = stat.filemode(st.st_mode)[0]
    return out


# --- extra checks -----------------------------------------------------------------------------------------


def printed(text: str) -> Callable[[World, Result], str | None]:
    def check(world: World, r: Result) -> str | None:
        return None if text.encode() in r.stdout + r.stderr else f"the output does not say {text!r}"
    return check


def no_escapes(world: World, r: Result) -> str | None:
    raw = [b for b in (b"\x1b", b"\x07") if b in r.stdout + r.stderr]
    return f"the output carries raw control bytes {raw}" if raw else None


def csv_cells_are_text(folder_name: str) -> Callable[[World, Result], str | None]:
    def check(world: World, r: Result) -> str | None:
        run = world.out(folder_name)
        for name in ("split.csv", "predictions.csv"):
            with open(run / name, newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    for cell in row:
                        if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                            try:
                                float(cell)
                            except ValueError:
                                return f"{name} has the cell {cell!r}, which a spreadsheet runs as a formula"
        classes = json.loads((run / "config.json").read_text())["model"]["classes"]
        if not any(c.startswith("=HYPERLINK") for c in classes):
            return "the class names did not survive"
        return None
    return check


def run_written(folder_name: str, *, keeps: dict[str, str] | None = None) -> Callable[[World, Result], str | None]:
    def check(world: World, r: Result) -> str | None:
        run = world.out(folder_name)
        if not (run / "model.safetensors").is_file() or not (run / "report.html").is_file():
            return f"{run} is not a complete run"
        for name, text in (keeps or {}).items():
            if not (run / name).is_file() or (run / name).read_text() != text:
                return f"the user's {name} in {run} was not kept as it was"
        leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        leftovers += [p.name for p in run.parent.iterdir() if ".tlearn-" in p.name]
        return f"temporary files were left: {leftovers}" if leftovers else None
    return check


def modes_follow_umask(world: World, r: Result) -> str | None:
    run = world.out("modes")
    wrong = {p.name: oct(p.stat().st_mode & 0o777) for p in run.iterdir() if p.is_file()
             and p.stat().st_mode & 0o777 != 0o644}
    return f"file modes under umask 022: {wrong}" if wrong else None


def nothing_escaped(world: World, r: Result) -> str | None:
    found = [str(p) for p in world.root.rglob("escaped*") if world.out("cmp") not in p.parents]
    return f"compare wrote outside its --out: {found}" if found else None


def report_is_the_models(world: World, r: Result) -> str | None:
    page = (world.cases["mixed"] / "report.html").read_text()
    return "the report mixes in config.json's classes" if ">cat<" in page or "'cat'" in page else None


# --- the cases --------------------------------------------------------------------------------------------


def cases() -> list[Case]:
    def train(data: Callable[[World], Path], out: str, *extra: str) -> Callable[[World], list[str]]:
        return lambda w: ["train", str(data(w)), *FEATURES, "--out", str(w.out(out)), *extra]

    def bad_flag(*flags: str) -> Callable[[World], list[str]]:
        return lambda w: ["train", str(w.data), *FEATURES, "--out", str(w.out("never")), *flags]

    def predict(name: str) -> Callable[[World], list[str]]:
        return lambda w: ["predict", str(w.cases[name]), str(w.image())]

    return [
        # hangs: special files are never opened
        Case("hang", "check: a FIFO in a class folder", lambda w: ["check", str(w.user / "with-fifo")], 0,
             printed("special-file")),
        Case("hang", "train: a FIFO in a class folder", train(lambda w: w.user / "with-fifo", "fifo"), 0),
        Case("hang", "train: a link to /dev/zero in a class folder", train(lambda w: w.user / "with-dev-zero", "z"),
             0),
        Case("hang", "predict: a FIFO", lambda w: ["predict", str(w.run), str(w.user / "with-fifo/blue/x.jpg")], 2,
             printed("FIFO")),
        Case("hang", "predict: /dev/zero", lambda w: ["predict", str(w.run), "/dev/zero"], 2),
        Case("hang", "predict: a folder holding a FIFO", lambda w: ["predict", str(w.run),
                                                                    str(w.user / "with-fifo/blue")], 0),
        Case("hang", "predict: 3,000,000 classes in the config", predict("classes-3m"), 2),
        Case("hang", "explain: a FIFO and /dev/zero",
             lambda w: ["explain", str(w.run), str(w.user / "with-fifo/blue/x.jpg"), "/dev/zero", "--out",
                        str(w.out("hm-fifo"))], 2),
        Case("hang", "train: --split-manifest is a FIFO", bad_flag("--split-manifest",
                                                                   "../user/manifest-fifo.csv"), 2),
        Case("hang", "train: --weights is a FIFO",
             lambda w: ["train", str(w.data), "--backbone", "test_efficientnet", "--weights",
                        str(w.user / "weights-fifo.safetensors"), "--mode", "features", "--out", str(w.out("wf"))], 2),
        Case("hang", "predict: model.safetensors links to /dev/zero", predict("zero-model"), 2),
        Case("hang", "predict: config.json is a FIFO", predict("fifo-config"), 0),
        # tracebacks: every bad flag is one line and exit 2
        Case("traceback", "--unfreeze ²", bad_flag("--mode", "finetune", "--unfreeze", "²"), 2),
        Case("traceback", "--device cuda:abc", bad_flag("--device", "cuda:abc"), 2),
        Case("traceback", "--device cuda:7 on this machine", bad_flag("--device", "cuda:7"), 2),
        Case("traceback", "--lr nan", bad_flag("--lr", "nan"), 2),
        Case("traceback", "--weight-decay nan", bad_flag("--weight-decay", "nan"), 2),
        Case("traceback", "--brightness-range 1,inf", bad_flag("--brightness-range", "1,inf"), 2),
        Case("traceback", "--epochs ١ (an Arabic-Indic one)", bad_flag("--epochs", "١"), 2),
        Case("traceback", "--seed -1", bad_flag("--seed", "-1"), 2),
        Case("traceback", "--workers 1000000", bad_flag("--workers", "1000000"), 2),
        Case("traceback", "--hidden 1000000", bad_flag("--hidden", "1000000"), 2),
        Case("traceback", "--val nan", bad_flag("--val", "nan"), 2),
        *[Case("traceback", f"predict: config edit {name}", predict(name), 2)
          for name in ("decision", "dropout", "format-version", "model-section", "hidden", "num-features-text",
                       "scratch-arch", "huge-widths", "deep-json", "novelty-rows", "novelty-scale",
                       "novelty-kind")],
        Case("traceback", "report: config edit decision", lambda w: ["report", str(w.cases["decision"])], 2),
        Case("traceback", "evaluate: config edit dropout", lambda w: ["evaluate", str(w.cases["dropout"])], 2),
        Case("traceback", "report: class names that do not match the counts",
             lambda w: ["report", str(w.cases["counts"])], 2),
        Case("traceback", "--resume: a checkpoint with no metadata",
             lambda w: ["train", str(w.data), *FEATURES, "--resume", str(w.cases["no-metadata"])], 2),
        Case("traceback", "--resume: a checkpoint with no history",
             lambda w: ["train", str(w.data), *FEATURES, "--resume", str(w.cases["no-history"])], 2),
        Case("traceback", "augment-preview: a decompression bomb",
             lambda w: ["augment-preview", str(w.user / "bomb.png"), "--out", str(w.out("preview.png"))], 2),
        # silently wrong: now refused, or handled
        Case("silently-wrong", "--lr 1e30 diverges", lambda w: ["train", str(w.data), *TINY, "--mode", "features",
                                                                "--head", "dense", "--lr", "1e30", "--out",
                                                                str(w.out("diverged"))], 2, printed("diverged")),
        Case("silently-wrong", "predict: tensors saved as int64", predict("int64"), 2),
        Case("silently-wrong", "--out inside a class folder",
             lambda w: ["train", str(w.data), *FEATURES, "--out", str(w.data / "blue" / "run")], 2),
        Case("silently-wrong", "predict --top-k 0", lambda w: ["predict", str(w.run), str(w.image()), "--top-k", "0"],
             2),
        Case("silently-wrong", "predict --top-k -1", lambda w: ["predict", str(w.run), str(w.image()), "--top-k",
                                                                "-1"], 2),
        Case("silently-wrong", "augment-preview --n 0",
             lambda w: ["augment-preview", str(w.image()), "--n", "0", "--out", str(w.out("n0.png"))], 2),
        Case("silently-wrong", "check --near-threshold -1",
             lambda w: ["check", str(w.data), "--near-threshold", "-1"], 2),
        Case("silently-wrong", "report: config.json from another run", lambda w: ["report", str(w.cases["mixed"])],
             0, report_is_the_models),
        # lost data: the user's files are never replaced
        Case("lost-data", "--out on a folder of the user's files",
             lambda w: ["train", str(w.data), *FEATURES, "--out", str(w.user / "notes")], 2),
        Case("lost-data", "--out is the data folder", lambda w: ["train", str(w.data), *FEATURES, "--out",
                                                                 str(w.data)], 2),
        Case("lost-data", "--out holds the data folder", lambda w: ["train", str(w.data), *FEATURES, "--out",
                                                                    str(w.user)], 2),
        Case("lost-data", "--out is a file", lambda w: ["train", str(w.data), *FEATURES, "--out",
                                                        str(w.root / "a-file")], 2),
        Case("lost-data", "explain --out is a file of the user's",
             lambda w: ["explain", str(w.run), str(w.image()), "--out", str(w.user / "notes" / "report.html")], 2),
        Case("lost-data", "--overwrite keeps the files tlearn did not write",
             train(lambda w: w.data, "overwrite-me", "--overwrite"), 0,
             run_written("overwrite-me", keeps={"mine.txt": "keep me\n"})),
        # injection
        Case("injection", "class folders named as spreadsheet formulas", train(lambda w: w.user / "formulas", "csv"),
             0, csv_cells_are_text("csv")),
        Case("injection", "compare: a model name that climbs out of --out",
             lambda w: ["compare", str(w.data), *TINY, "--models", "../../../escaped:features", "--out",
                        str(w.out("cmp"))], 2, nothing_escaped),
        Case("injection", "check: a class folder named with escape codes",
             lambda w: ["check", str(w.user / "escapes")], 0, no_escapes),
        Case("injection", "train: a class folder named with escape codes",
             train(lambda w: w.user / "escapes", "esc"), 0, no_escapes),
        Case("injection", "predict: a run whose class names hold escape codes", predict("classes-escape"), 0,
             no_escapes),
        Case("injection", "explain: a run whose class names hold escape codes",
             lambda w: ["explain", str(w.cases["classes-escape"]), str(w.image()), "--out", str(w.out("hm-esc"))], 0,
             no_escapes),
        # small
        Case("small", "a killed save's temporary file is cleaned up", train(lambda w: w.data, "stale"), 0,
             run_written("stale")),
        Case("small", "file modes follow the umask", train(lambda w: w.data, "modes"), 0, modes_follow_umask),
        # beyond the report
        Case("beyond", "train: broken link, link loop, a folder named .jpg, a zero-byte file, odd names",
             train(lambda w: w.user / "odd-entries", "odd"), 0),
        Case("beyond", "check: the same odd entries", lambda w: ["check", str(w.user / "odd-entries")], 0,
             printed("new\\nline.png")),
        Case("beyond", "predict: the run folder is a file", lambda w: ["predict", str(w.root / "a-file"),
                                                                       str(w.image())], 2),
    ]


def run_case(world: World, case: Case) -> str | None:
    """Run one case; the problem, or None when it holds."""
    before = snapshot(world.user)
    r = tlearn(world, case.argv(world))
    problems = []
    if r.rc == -1:
        problems.append(f"no answer within {TIME_LIMIT} s")
    elif r.rc != case.expect:
        problems.append(f"exit {r.rc}, expected {case.expect}")
    if b"Traceback" in r.stderr:
        problems.append("a traceback")
    if case.expect == 2 and r.rc == 2 and len(r.stderr.decode(errors="replace").strip().splitlines()[-1:]) != 1:
        problems.append("no one-line error")
    if snapshot(world.user) != before:
        problems.append("the user's files changed")
    if not problems and case.check:
        extra = case.check(world, r)
        if extra:
            problems.append(extra)
    if problems:
        tail = r.stderr.decode(errors="replace").strip()[-1500:]
        return "; ".join(problems) + f"\n--- stderr ---\n{tail}"
    return None


def main() -> int:
    import tempfile
    from collections import Counter

    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp))
        held, total, failed = Counter(), Counter(), []
        for case in cases():
            problem = run_case(world, case)
            total[case.kind] += 1
            held[case.kind] += problem is None
            if problem:
                failed.append(f"{case.kind}: {case.name}: {problem}")
    print("| kind | cases | hold |\n|---|---|---|")
    for kind in total:
        print(f"| {kind} | {total[kind]} | {held[kind]} |")
    print(f"| all | {sum(total.values())} | {sum(held.values())} |")
    for f in failed:
        print("\n" + f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
