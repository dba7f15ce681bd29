"""Issue 26 item 6: every entry script refuses a bad input (missing recipe / config / model folder / data,
taken output, value out of range, a resumed search from another template) with exit status 2 and a
one-line message BEFORE torch or transformers load. The cases are scripts/benchmark_refusals.py's (which
also times them); here all run in one fresh interpreter, checking sys.modules after each."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNNER = """
import contextlib, importlib, io, json, sys
sys.path.insert(0, {repo!r})
results = []
for script, argv in {cases!r}:
    module = importlib.import_module(script)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = module.main(argv)
        except SystemExit as exit:
            code = exit.code
    lines = err.getvalue().strip().splitlines()
    results.append({{"code": code if isinstance(code, int) or code is None else str(code),
                    "message": lines[-1] if lines else "", "traceback": "Traceback" in err.getvalue(),
                    "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}})
print(json.dumps(results))
"""


def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_refusals", REPO / "scripts" / "benchmark_refusals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_refusal_comes_before_torch_loads():
    bench = benchmark()
    folder = bench.workspace()
    cases = [(script, argv) for script, argv, _ in bench.CASES]
    assert {script for script, _ in cases} >= {path.stem for path in REPO.glob("*.py")}, "an entry script has no case"
    result = subprocess.run([sys.executable, "-c", RUNNER.format(repo=str(REPO), cases=cases)], cwd=folder,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    for (script, argv, fragment), outcome in zip(bench.CASES, outcomes):
        where = f"{script}.py {' '.join(argv)}: {outcome}"
        assert outcome["code"] == 2, where
        assert fragment in outcome["message"], where
        assert not outcome["traceback"], where
        assert outcome["heavy"] == [], f"torch / transformers loaded before the refusal: {where}"
