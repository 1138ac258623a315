"""Docs that cannot lie: every ```python and ```bash block of the README, CONTRIBUTING, the
benchmarks page and the site's pages (docs/**/*.md) runs here, page by page, in order.

How a page runs (the documented fixture, `docs_world`):
- in a fresh working directory holding the files the examples name: `photo.jpg`, `cat.jpg`,
  `a.jpg`, `b.jpg`, `images/` (photographs from scikit-image) and `photos/train/<class>/`,
  `photos/val/<class>/` (a small two-class set);
- with hub ids answered from a local folder: every `microsoft/cvt-...` id a page names is
  saved, as a small stand-in with random weights (the variant's labels and three-stage shape,
  preprocessing at 64 pixels, so that the examples that train, export or calibrate take
  seconds), into a Hugging Face cache
  (`HF_HUB_CACHE`) and the hub is offline (`HF_HUB_OFFLINE=1`), so `from_pretrained`,
  `cvt predict microsoft/cvt-13` and friends go through the real hub code path;
- python blocks share one namespace per page (later blocks use earlier names); bash blocks run
  in `bash -e -o pipefail` in the same directory, with this interpreter's `cvt` on the PATH;
- the page's runner and each `cvt` command start forked from one process that has imported cvt
  (`forking_cvt`), not paying the ~5 s of imports each: a page's time is its examples' own.

A block that cannot run offline carries, on the line before its fence,
`<!-- docs-test: skip (why) -->`; a page whose blocks take long carries `<!-- docs-test: slow -->`;
a page that needs the hub ids to hold the published architectures carries
`<!-- docs-test: published architectures -->`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT

RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")
SLOW_PAGE = "<!-- docs-test: slow -->"
HUB_ID = re.compile(r"\bmicrosoft/(cvt-[\w.-]*\w)")
VARIANT_NAME = re.compile(r"(?<![\w/-])(cvt-[\w.-]*\w)\b")
PAGE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    lang: str  # "python" or "bash"
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # why it cannot run here, from its marker


def doc_pages() -> list[Path]:
    pages = [REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", REPO_ROOT / "benchmarks" / "README.md",
             *sorted((REPO_ROOT / "docs").glob("**/*.md"))]
    return [page for page in pages if page.is_file()]


def code_blocks(text: str) -> list[Block]:
    """The fenced python and bash blocks of a Markdown text, dedented, with their skip markers."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening["fence"], i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        lang = RUNNABLE.get(opening["lang"].lower())
        marker = SKIP.search(lines[start - 1]) if start > 0 else None
        if lang:
            body = "\n".join(lines[start + 1:i])
            blocks.append(Block(lang, textwrap.dedent(body), start + 1, marker and marker["why"].strip()))
        i += 1
    return blocks


def page_id(page: Path) -> str:
    return page.relative_to(REPO_ROOT).as_posix()


def page_params() -> list:
    params = []
    for page in doc_pages():
        marks = [pytest.mark.slow] if SLOW_PAGE in page.read_text(encoding="utf-8") else []
        params.append(pytest.param(page, id=page_id(page), marks=marks))
    return params


# The runner: one fresh interpreter per page, so the hub environment applies from its first import.
RUNNER = r"""
import json, subprocess, sys, time, traceback
page, blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
start = time.perf_counter()
for block in blocks:
    where = f"{page}:{block['line']}"
    print(f"--- {where} ({block['lang']}) at {time.perf_counter() - start:.1f} s", flush=True)
    if block["lang"] == "python":
        try:
            exec(compile(block["code"], where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"docs block failed: {where}")
    elif subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]]).returncode != 0:
        sys.exit(f"docs block failed: {where}")
print(f"--- {page}: all blocks ran in {time.perf_counter() - start:.1f} s", flush=True)
"""


def run_page(name: str, blocks: list[Block], workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    spec = workdir / ".docs-blocks.json"
    runnable = [b.__dict__ for b in blocks if b.skip is None]
    spec.write_text(json.dumps([name, runnable]), encoding="utf-8")
    forked = shutil.which(FORKED_PYTHON, path=env.get("PATH"))  # set up by docs_world
    python = [forked] if forked else [sys.executable, "-c"]
    return subprocess.run([*python, RUNNER, str(spec)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)


def save_photo(array, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert("RGB").save(path, quality=90)


def make_files(root: Path) -> None:
    """The files the examples name, from scikit-image's photographs (shipped with the package)."""
    from skimage import data

    photos = {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "camera": data.camera()}
    save_photo(photos["astronaut"], root / "photo.jpg")
    save_photo(photos["cat"], root / "cat.jpg")
    save_photo(photos["coffee"], root / "a.jpg")
    save_photo(photos["rocket"], root / "b.jpg")
    for name, array in photos.items():
        save_photo(array, root / "images" / f"{name}.jpg")
    # photos/{train,val}/<class>/: crops and flips of two photographs, one class each
    for label, array in (("cat", photos["cat"]), ("coffee", photos["coffee"])):
        for split, count in (("train", 6), ("val", 2)):
            for k in range(count):
                view = array[k * 9:, k * 7:][:, ::-1 if k % 2 else 1]
                save_photo(view, root / "photos" / split / label / f"{label}{k}.jpg")


# the hub checkpoints' stand-ins: each variant's labels, preprocessing and three-stage shape (a
# class token in the last stage), small and at a small input size, so that the examples that
# train, export, quantise and measure engines take seconds, not minutes (every published
# architecture goes through the same checks in test_models). A page that needs the published
# architecture itself (`create_model(name, pretrained=True)` checks it) carries PUBLISHED_PAGE.
HUB_IMAGE_SIZE = 64
STAND_IN = {"depth": (1, 1, 2), "embed_dim": (16, 32, 64), "num_heads": (1, 2, 4)}
PUBLISHED_PAGE = "<!-- docs-test: published architectures -->"


def make_hub_cache(cache: Path, ids: set[str], architecture: dict) -> Path:
    """Hugging Face's cache layout (refs/main -> snapshots/<revision>/files) for each hub id,
    holding the variant with `architecture` changed, random weights, preprocessed at HUB_IMAGE_SIZE."""
    import torch

    import cvt
    from cvt.variants import VARIANTS

    revision = "0" * 40
    torch.manual_seed(0)  # the same checkpoints on every test worker
    for variant in sorted(ids):
        folder = cache / f"models--microsoft--{variant}" / "snapshots" / revision
        cvt.CvtForImageClassification(VARIANTS[variant].config(**architecture)).save_pretrained(folder)
        cvt.CvtImageProcessor(size=HUB_IMAGE_SIZE).save_pretrained(folder)
        (folder.parents[1] / "refs").mkdir(exist_ok=True)
        (folder.parents[1] / "refs" / "main").write_text(revision)
    return cache


def named_hub_ids(pages: list[Path]) -> set[str]:
    """The hub ids the pages name: `microsoft/cvt-...`, and the variant names ("cvt-13") that
    `create_model(..., pretrained=True)` and the CLI read from the hub."""
    from cvt.variants import VARIANTS

    texts = [page.read_text(encoding="utf-8") for page in pages]
    quoted = {m for text in texts for m in VARIANT_NAME.findall(text)} & set(VARIANTS)
    return {m for text in texts for m in HUB_ID.findall(text)} | quoted


# The pages' `cvt` commands, and each page's runner: each would spend ~5 s importing torch and
# transformers before it does anything. Here they run in processes forked from one that has
# imported cvt once: the `cvt` first on the pages' PATH (and `python-forked`, which starts a page's
# RUNNER) hands its arguments, working directory, environment and standard streams to that
# process, which forks and runs `cvt.cli.entry` (or the code) with them, and answers with the exit
# status. A command whose environment differs from the one the imports were made in (an `export`
# in a block, another hub) runs in a fresh interpreter instead. The console script's own start is
# tested in test_cli_startup.py and test_packaging.py.
FORKING_CVT = r"""
import gc, json, os, signal, socket, sys
import cvt.cli, cvt.modeling  # what every command imports first: imported once for them all
gc.freeze()  # their objects stay out of the children's collections (which would copy their pages)
LOCAL = {"PWD", "OLDPWD", "SHLVL", "_"}  # what the shell sets for each command
home = {k: v for k, v in os.environ.items() if k not in LOCAL}
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(sys.argv[1])
listener.listen(8)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the per-request children
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if os.fork() == 0:
        break
    conn.close()
    for fd in fds:
        os.close(fd)
listener.close()
signal.signal(signal.SIGCHLD, signal.SIG_DFL)
request = json.loads(message)
if {k: v for k, v in request["env"].items() if k not in LOCAL} != home:
    conn.send(b"exec")
    os._exit(0)
command = os.fork()
if command == 0:  # the command: exits as the console script does, through cvt.cli.entry
    conn.close()
    for ignored in request["ignored"]:  # as a shell's background job starts
        signal.signal(ignored, signal.SIG_IGN)
    os.setpriority(os.PRIO_PROCESS, 0, request["nice"])  # the caller's, as a fresh process inherits
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    if request["code"] is None:
        cvt.cli.entry()
    exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
    sys.exit(0)
for fd in fds:
    os.close(fd)
conn.send(str(command).encode())  # for the signals sent to the shim
_, status = os.waitpid(command, 0)
conn.send(str(os.waitstatus_to_exitcode(status)).encode())
os._exit(0)
"""

FORKED_PYTHON = "python-forked"
CVT_SHIM = r"""#!{python} -S
import json, os, signal, socket, sys
fresh = {fresh!r}  # the console script, or the interpreter and "-c"
code = sys.argv[1] if len(fresh) > 1 else None
argv = [fresh[-1], *sys.argv[2 if code else 1:]]  # sys.argv as the fresh process would have it
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(os.environ["CVT_DOCS_FORKING"])
forwarded = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
ignored = [int(s) for s in forwarded if signal.getsignal(s) == signal.SIG_IGN]
request = {{"argv": argv, "code": code, "cwd": os.getcwd(), "env": dict(os.environ), "ignored": ignored,
           "nice": os.getpriority(os.PRIO_PROCESS, 0)}}
socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
answer = conn.recv(64)
if answer == b"exec":
    os.execv(fresh[0], [*fresh, *sys.argv[1:]])

def forward(sig, frame, pid=int(answer)):  # a signal to this process goes to the command
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

for sig in set(forwarded) - set(ignored):
    signal.signal(sig, forward)
status = int(conn.recv(64))
sys.exit(status if status >= 0 else 128 - status)
"""


@contextmanager
def forking_cvt(folder: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`env` with a `cvt` first on its PATH (and `python-forked CODE ARGS...`, as `python -c`)
    that runs each command forked from one process that has imported cvt (FORKING_CVT); that
    process and whatever it forked end with the block."""
    import select

    (folder / "bin").mkdir(parents=True)
    for name, fresh in (("cvt", [shutil.which("cvt", path=env["PATH"])]), (FORKED_PYTHON, [sys.executable, "-c"])):
        shim = folder / "bin" / name
        shim.write_text(CVT_SHIM.format(python=sys.executable, fresh=fresh), encoding="utf-8")
        shim.chmod(0o755)
    env = {**env, "CVT_DOCS_FORKING": str(folder / "socket"), "PATH": f"{folder / 'bin'}{os.pathsep}{env['PATH']}"}
    server = subprocess.Popen([sys.executable, "-c", FORKING_CVT, str(folder / "socket")], env=env,
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 300)
        assert ready and server.stdout.readline() == b"ready\n", "the forking cvt did not start"
        yield env
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # its own session: the server and its children
        server.wait(timeout=60)
        server.stdout.close()


@pytest.fixture(scope="session")
def docs_world(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """(a folder of the example files, the environment) shared by every page."""
    from cvt.variants import VARIANTS

    root = tmp_path_factory.mktemp("docs-world")
    make_files(root / "files")
    named = named_hub_ids(doc_pages())
    unknown = named - set(VARIANTS)
    assert not unknown, f"the docs name hub ids that are no published variant: {sorted(unknown)}"
    make_hub_cache(root / "hub", named, STAND_IN)
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
           "CVT_CACHE_DIR": str(root / "engine-cache"), "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with forking_cvt(root / "forking", env) as env:
        yield root / "files", env


@pytest.fixture(scope="session")
def published_hub(tmp_path_factory) -> Path:
    """A hub cache of the published architectures, for the pages that carry PUBLISHED_PAGE."""
    pages = [page for page in doc_pages() if PUBLISHED_PAGE in page.read_text(encoding="utf-8")]
    return make_hub_cache(tmp_path_factory.mktemp("published-hub"), named_hub_ids(pages), {})


def fresh_workdir(files: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(files, workdir)
    return workdir


@pytest.mark.subprocess
@pytest.mark.parametrize("page", page_params())
def test_docs_page_runs(page, docs_world, tmp_path, request):
    files, env = docs_world
    text = page.read_text(encoding="utf-8")
    if PUBLISHED_PAGE in text:
        env = {**env, "HF_HUB_CACHE": str(request.getfixturevalue("published_hub"))}
    blocks = code_blocks(text)
    done = run_page(page_id(page), blocks, fresh_workdir(files, tmp_path), env)
    starts = [line for line in done.stdout.splitlines() if line.startswith("--- ")]
    print("\n".join(starts))  # when each block started: shown with -s, or -rP
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"


def test_every_page_has_its_blocks_found_and_skips_say_why():
    counts = {page_id(p): len(code_blocks(p.read_text(encoding="utf-8"))) for p in doc_pages()}
    assert counts["README.md"] >= 2 and sum(counts.values()) >= 30, counts
    for page in doc_pages():
        text = page.read_text(encoding="utf-8")
        # a marker must sit right before a runnable fence, or it hides nothing and misleads
        marked = {b.line - 1 for b in code_blocks(text) if b.skip}
        markers = {n for n, line in enumerate(text.splitlines(), 1) if SKIP.search(line)}
        assert markers == marked, f"{page_id(page)}: markers not followed by a python/bash block"


def test_the_block_parser_reads_fences_markers_and_indentation():
    text = ("intro\n```python\nx = 1\n```\n- item\n\n    ```bash\n    cvt --help\n    ```\n"
            "<!-- docs-test: skip (needs a GPU) -->\n```python\nmodel.cuda()\n```\n```text\nout\n```\n")
    assert code_blocks(text) == [Block("python", "x = 1", 2, None), Block("bash", "cvt --help", 7, None),
                                 Block("python", "model.cuda()", 11, "needs a GPU")]


def test_a_broken_block_fails_its_page(tmp_path):
    """The harness fails a page, naming the block, when a block raises or a command fails."""
    blocks = code_blocks("```python\nimport math\nvalue = math.sqrt(4)\n```\n\n"
                         "```python\nassert value == 3, 'a wrong claim'\n```\n")
    done = run_page("broken.md", blocks, tmp_path, dict(os.environ))
    assert done.returncode != 0 and "docs block failed: broken.md:6" in done.stderr
    assert "AssertionError: a wrong claim" in done.stderr
    failing_command = code_blocks("```bash\ntrue\nfalse\necho never\n```\n")
    done = run_page("broken.md", failing_command, tmp_path, dict(os.environ))
    assert done.returncode != 0 and "docs block failed: broken.md:1" in done.stderr
    assert "never" not in done.stdout


def test_the_forked_commands_answer_as_fresh_processes(docs_world):
    """The pages' `cvt` and page runner (forked from a process that has imported cvt) give what
    fresh processes give: the same output and exit status for good and failing commands; a
    signal sent to one reaches the command; another environment gets a fresh interpreter."""
    files, env = docs_world
    shims = Path(shutil.which("cvt", path=env["PATH"])).parent
    fresh_env = {**env, "PATH": env["PATH"].replace(f"{shims}{os.pathsep}", "", 1)}
    for args in (["--version"], ["info", "cvt-13"], ["info", "no-such-model"]):
        forked, fresh = (subprocess.run(["cvt", *args], env=e, cwd=files, capture_output=True, text=True, timeout=300)
                         for e in (env, fresh_env))
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == 2 and "no-such-model" in fresh.stderr

    def preloaded(environment: dict[str, str]) -> str:
        return subprocess.run([shims / FORKED_PYTHON, "import sys; print('cvt.modeling' in sys.modules)"],
                              env=environment, capture_output=True, text=True, timeout=300).stdout
    assert preloaded(env) == "True\n" and preloaded({**env, "ANOTHER_SETTING": "1"}) == "False\n"
    sleeper = subprocess.Popen([shims / FORKED_PYTHON, "import time; print('up', flush=True); time.sleep(300)"],
                               env=env, stdout=subprocess.PIPE, text=True)
    assert sleeper.stdout.readline() == "up\n"
    sleeper.terminate()
    assert sleeper.wait(timeout=60) == 128 + signal.SIGTERM
    sleeper.stdout.close()


def load_hook(name: str):
    """A module of docs/hooks/ (the site build's own code), imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", REPO_ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_lists_every_option_of_every_command():
    import argparse

    from cvt.cli import build_parser

    hook = load_hook("cli_reference")
    assert hook.PLACEHOLDER in (REPO_ROOT / "docs" / hook.PAGE).read_text(encoding="utf-8")
    sections = dict(s.split("\n", 1) for s in ("\n" + hook.render_cli_reference()).split("\n## ")[1:])
    parser = build_parser()
    commands = {"cvt": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update({f"cvt {name}": sub for name, sub in action.choices.items()})
    assert set(sections) == set(commands)
    for title, command in commands.items():
        rows = "\n".join(line for line in sections[title].splitlines() if line.startswith("| `"))
        for action in command._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            for name in action.option_strings or [action.metavar or action.dest]:
                if name not in ("-h", "--help"):
                    assert re.search(rf"^\| `(.*, )?{re.escape(name)}[ `,]", rows, re.M), (title, name)


# --- numbers, words and navigation: what a reader meets before running anything ---

# the pages that quote measured numbers, and which must take them from benchmarks/results
QUOTING_PAGES = ["README.md", "docs/index.md", "docs/guides/engines-and-export.md"]
# a measured ratio (3.85×, not 224×224) or a change in points of top-1 (−0.12 points)
MEASURED = re.compile(r"(?<![\w.])[−-]?\d+(?:\.\d+)?\s*×(?!\s*\d)|[−-]\d+(?:\.\d+)? points?\b")


def quoted_outside_results(text: str, hook) -> list[str]:
    """Measured numbers written into `text` by hand: outside its placeholders and outside the
    README's generated block."""
    if hook.README_BEGIN in text:
        text = text.replace(hook.readme_current(text), "")
    return MEASURED.findall(hook.PLACEHOLDER.sub("", text))


def test_quoted_numbers_come_from_the_results_files():
    """The README, Home and the engines page quote benchmarks/results/*.json through the hook
    (the README through its generated block), name the machine and date of every file they
    quote, and write no measured number by hand."""
    hook = load_hook("bench_numbers")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    current, wanted = hook.readme_current(readme), hook.readme_block()
    stale = sorted(set(MEASURED.findall(current)) - set(MEASURED.findall(wanted)))
    assert current == wanted, (f"README.md quotes {stale or 'text'} that benchmarks/results does not hold "
                               "there: run `python docs/hooks/bench_numbers.py`")
    sources = {name: (REPO_ROOT / name).read_text(encoding="utf-8") for name in QUOTING_PAGES}
    sources["README.md"] = hook.README_TEMPLATE.read_text(encoding="utf-8")  # what its block says
    for name, text in sources.items():
        by_hand = quoted_outside_results((REPO_ROOT / name).read_text(encoding="utf-8"), hook)
        assert not by_hand, f"{name} quotes {by_hand} by hand: quote benchmarks/results through {{{{ bench:... }}}}"
        hook.render(text, where=name)  # every placeholder names one value of a results file
        files = {m["body"].split("|")[0].strip() for m in hook.PLACEHOLDER.finditer(text)}
        assert files, f"{name} quotes no results file"
        for file in files:
            for field in ("machine", "date"):
                assert re.search(rf"\{{\{{\s*bench:\s*{re.escape(file)}\s*\|\s*{field}\s*\}}\}}", text), (
                    f"{name} quotes {file} without naming its {field}")


def test_a_placeholder_names_a_value_of_a_results_file_or_stops_the_build():
    from mkdocs.exceptions import PluginError

    hook = load_hook("bench_numbers")
    text = "{{ bench:zen5-inference | CvT-13 224 b32 | engine openvino | speedup }}× on a {{ bench:zen5-inference | cpu }}"
    assert hook.render(text) == "3.66× on a AMD EPYC"
    assert hook.quote("zen5-fashion-mnist | engine openvino int8 | against_fp32_points") == "\u22120.12"
    assert hook.quote("zen3-round-one | CvT-13 224 train b16 ckpt | ratio:.2f") == "0.60"
    for body, error in (("zen5-inference | CvT-13 224 b1 | engine tensorrt | speedup", "no results row has 'engine tensorrt'"),
                        ("zen9-inference | date", "no results file benchmarks/results/zen9-inference.json"),
                        ("zen5-inference | CvT-13 224 b1 | speedup", "names 10 values, not one")):
        with pytest.raises(PluginError, match=re.escape(error)):
            hook.quote(body)


def test_results_files_name_their_cpu_date_and_commit_and_match_the_benchmarks_page():
    """Each results file names the CPU, the date and a commit of this repository; those
    transcribed from the benchmarks page's tables hold the page's numbers."""
    page = (REPO_ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8").replace("**", "")
    files = sorted((REPO_ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for path in files:
        result = json.loads(path.read_text(encoding="utf-8"))
        assert result["cpu"] and re.fullmatch(r"\d{4}-\d{2}-\d{2}", result["date"]), path.name
        known = subprocess.run(["git", "cat-file", "-e", f"{result['commit'].removesuffix('-dirty')}^{{commit}}"],
                               cwd=REPO_ROOT, capture_output=True)
        assert known.returncode == 0, f"{path.name}: commit {result['commit']} is not in this repository"
        if "transcribed" not in result.get("source", ""):
            continue
        for row in result["results"]:
            if "speedup" in row:
                shown = f"{row['speedup']:.2f}× [{row['speedup_min']:.2f}–{row['speedup_max']:.2f}]"
            elif "ratio" in row:
                shown = f"| {row['transformers_mb']} MB | {row['cvt_mb']} MB | {row['ratio']:.2f}×"
            else:
                shown = f"{row['top1']:.2f} %" if "top1" in row else f"{row['max_abs_logit_error']:.1e}".replace("e-0", "e-")
            assert shown in page, f"{path.name}: {row} is not on the benchmarks page ({shown!r})"


# words that mean something only to the people who wrote the page
AUTHORS_WORDS = re.compile("|".join([
    r"\bissues? #?\d+", r"(?<![&\w])#\d+\b", r"\bthe (?:\w+ )?issue(?:'s)?\b",  # the tracker's numbers and threads
    r"\bsessions?\b",  # the writer's working session ("the previous session")
    r"/tmp\b",  # a path on the writer's machine
    r"\b(?:tested|measured|timed|looked into|checked) here\b",  # "here": on the writer's machine
    r"(?<![\d.,])\d[\d.,]*\s*(?:ms|s|seconds?|minutes?|hours?)\s+here\b", r"\bno GPU here\b",
]), re.IGNORECASE)


def authors_words(text: str) -> list[str]:
    return [f"{n}: {m.group(0)!r}" for n, line in enumerate(text.splitlines(), 1) for m in AUTHORS_WORDS.finditer(line)]


def test_no_page_speaks_in_its_authors_words():
    """The README, CONTRIBUTING, the benchmarks page and the site say nothing only their authors
    understand: issue numbers, "session", /tmp paths, "35 s here", "not tested here"."""
    found = {page_id(p): authors_words(p.read_text(encoding="utf-8")) for p in doc_pages()}
    found = {page: hits for page, hits in found.items() if hits}
    assert not found, f"authors' words (say what a reader can check instead): {found}"
    assert authors_words("as issue 12 says\nsee #12, measured in the previous session\nin /tmp/x, 35 s here") == [
        "1: 'issue 12'", "2: '#12'", "2: 'session'", "3: '/tmp'", "3: '35 s here'"]
    assert not authors_words("onnxruntime's InferenceSession, `session_latest`, 224×224, [a](#x), here is how")


def test_the_install_table_lists_every_extra():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    page = (REPO_ROOT / "docs" / "getting-started" / "install.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w-]+)` \|", page, re.M))
    assert set(extras) - rows == set(), f"the Install page's extras table lacks {sorted(set(extras) - rows)}"
    assert rows - set(extras) == set(), f"the Install page lists extras pyproject.toml lacks: {sorted(rows - set(extras))}"


def test_the_cli_page_table_names_every_command():
    import argparse

    from cvt.cli import build_parser

    hook = load_hook("cli_reference")
    page = (REPO_ROOT / "docs" / hook.PAGE).read_text(encoding="utf-8").split(hook.PLACEHOLDER)[0]
    table = "\n".join(line for line in page.splitlines() if line.startswith("| `cvt "))
    commands = {name for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
                for name in action.choices}
    missing = sorted(name for name in commands if not re.search(rf"`cvt {name}[ `]", table))
    assert commands and not missing, f"the CLI page's command table lacks {missing}"


def test_home_where_to_start_links_every_guide():
    import yaml

    nav = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    guides = next(entry["Guides"] for entry in nav if "Guides" in entry)
    home = (REPO_ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    where = home.split("## Where to start", 1)[1]
    missing = [page for entry in guides for page in entry.values() if f"]({page})" not in where]
    assert not missing, f"Home's 'Where to start' does not link {missing}"
