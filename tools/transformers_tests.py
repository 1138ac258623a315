"""Run transformers' own CvT model tests against transformers' classes and against cvt's.

Why: cvt's `CvtConfig`, `CvtModel` and `CvtForImageClassification` mean to be drop-in
replacements for transformers' classes. transformers' test suite for its CvT
(tests/models/cvt/test_modeling_cvt.py with ModelTesterMixin, ConfigTester and
PipelineTesterMixin) is the strictest outside check of that claim. This script runs that
suite twice in subprocesses -- once as it is (the baseline), once with cvt's three classes put
in transformers' place before the test module is imported -- and lists every test that passes
for transformers but not for cvt.

`--tests DIR` is a transformers source tree (or the part of it the suite needs): it must hold
tests/models/cvt/test_modeling_cvt.py and the mixins it imports, matching the installed
transformers release. Rerun with:

    python tools/transformers_tests.py --tests /path/to/transformers-X.Y.Z

(prefix `PYTHONPATH=$PWD/src` to test a checkout's cvt). Extra pytest arguments follow `--`,
e.g. `-- -k test_config`. Exit status: 0 when every test passing for transformers also passes
for cvt (but for DELIBERATE, listed with its reason), 1 when some does not, 2 when the baseline
itself passes nothing (a broken tree).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

TEST_FILE = "tests/models/cvt/test_modeling_cvt.py"
NAMES = ("CvtConfig", "CvtModel", "CvtForImageClassification")
RANK = {"passed": 0, "skipped": 1, "failure": 2, "error": 3}
# tests transformers passes that cvt fails on purpose, and why (listed, not counted as lost)
DELIBERATE = {
    "CvtModelTest::test_model_weights_reload_no_missing_tied_weights":
        "loads a file holding none of the model's weights and expects every weight reported "
        "missing; cvt refuses weights of no CvT stage (never a randomly initialised model from "
        "a wrong file), one of the checks it runs before transformers' loading",
}

# A pytest plugin (loaded with -p before collection) that puts cvt's classes where
# transformers' tests and its Auto classes look them up, then checks that the collected
# test module really got cvt's classes, so a silent fallback to transformers' cannot pass.
PLUGIN = textwrap.dedent(
    '''
    import importlib
    import sys

    import pytest

    NAMES = {names!r}


    def pytest_configure(config):
        import cvt
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

        ours = {{name: getattr(cvt, name) for name in NAMES}}
        for module in ("transformers", "transformers.models.cvt",
                       "transformers.models.cvt.configuration_cvt", "transformers.models.cvt.modeling_cvt"):
            importlib.import_module(module)
            for name in NAMES:
                if hasattr(sys.modules[module], name):
                    setattr(sys.modules[module], name, ours[name])
        AutoConfig.register("cvt", ours["CvtConfig"], exist_ok=True)
        AutoModel.register(ours["CvtConfig"], ours["CvtModel"], exist_ok=True)
        AutoModelForImageClassification.register(
            ours["CvtConfig"], ours["CvtForImageClassification"], exist_ok=True)


    def pytest_collection_modifyitems(items):
        import cvt

        for item in items:
            module = getattr(item, "module", None)
            for name in NAMES:
                found = getattr(module, name, None)
                if found is not None and found is not getattr(cvt, name):
                    raise pytest.UsageError(f"{{module.__name__}}.{{name}} is {{found!r}}, not cvt's")
    '''
).format(names=NAMES)


def run_pytest(tests: Path, report: Path, extra: list[str], plugin_dir: str | None) -> None:
    """Run the CvT test file once under pytest, serially, writing a JUnit XML report."""
    env = dict(os.environ)
    command = [sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider",
               "-p", "no:xdist", "-p", "no:randomly", f"--junitxml={report}", *extra]
    if plugin_dir:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [plugin_dir, env.get("PYTHONPATH")]))
        command += ["-p", "cvt_swap_plugin"]
    subprocess.run(command, cwd=tests, env=env, stdout=subprocess.DEVNULL, check=False)


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """Map `Class::test` to (outcome, the failure or skip message on one line) from a JUnit report."""
    if not report.is_file():
        return {}
    results = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                text = node.get("message") or node.text or ""
                outcome, reason = kind, " ".join(text.split())[:240]  # the message, on one line
                break
        if RANK[outcome] > RANK[results.get(name, ("passed", ""))[0]]:  # a name seen twice keeps its worst
            results[name] = (outcome, reason)
        results.setdefault(name, (outcome, reason))
    return results


def counts(results: dict[str, tuple[str, str]]) -> str:
    """'N passed, N failure, ...' for one run."""
    tally: dict[str, int] = {}
    for outcome, _ in results.values():
        tally[outcome] = tally.get(outcome, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(tally.items())) or "nothing ran"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, required=True, help="transformers tree holding " + TEST_FILE)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = parser.parse_args(argv)
    if not (args.tests / TEST_FILE).is_file():
        parser.error(f"{args.tests / TEST_FILE} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "cvt_swap_plugin.py").write_text(PLUGIN)
        run_pytest(args.tests, Path(tmp, "transformers.xml"), args.pytest_args, None)
        run_pytest(args.tests, Path(tmp, "cvt.xml"), args.pytest_args, tmp)
        theirs, ours = outcomes(Path(tmp, "transformers.xml")), outcomes(Path(tmp, "cvt.xml"))
    print(f"transformers' classes: {counts(theirs)}")
    print(f"cvt's classes:         {counts(ours)}")
    passing = sorted(name for name, (outcome, _) in theirs.items() if outcome == "passed")
    failing = [name for name in passing if ours.get(name, ("missing", "not run for cvt"))[0] != "passed"]
    lost = [name for name in failing if name not in DELIBERATE]
    gained = sorted(n for n, (o, _) in ours.items() if o == "passed" and theirs.get(n, ("",))[0] != "passed")
    print(f"\npassing for transformers, not for cvt: {len(lost)}")
    for name in lost:
        outcome, reason = ours.get(name, ("missing", "not run for cvt"))
        print(f"  {name}  [{outcome}] {reason}")
    for name in (name for name in failing if name in DELIBERATE):
        print(f"\nfailing on purpose: {name}\n  {DELIBERATE[name]}")
    print(f"\npassing for cvt only: {len(gained)}")
    for name in gained:
        print(f"  {name}")
    for name, (outcome, reason) in sorted(ours.items()):
        if name not in theirs and outcome in ("failure", "error"):  # e.g. the module failed to import
            print(f"\ncvt run only: {name}  [{outcome}] {reason}")
    if not passing:
        print("\nthe baseline passed nothing: check the --tests tree", file=sys.stderr)
        return 2
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
