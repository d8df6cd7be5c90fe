"""``python tests/unit/cli_battery.py CASES.json RESULTS.json``: run each case's tool
(``{"tool": "tools/x.py" or "megatron_elastic.train", "argv": [...]}``) in this one process
through its real entry point (``main(argv)``, as ``python tools/x.py`` calls it), recording the
exit status, what it wrote to stdout and stderr, and the traceback of anything that escaped
``main``.

One process for the whole battery: megatron-core is imported once instead of once per case."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _entry(tool: str):
    if tool.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(tool).stem, ROOT / tool)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(tool).main


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for case in cases:
        stdout, stderr = io.StringIO(), io.StringIO()
        record: dict = {"rc": None, "traceback": None}
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                record["rc"] = _entry(case["tool"])(case["argv"])
            except SystemExit as exc:  # argparse
                record["rc"] = exc.code
            except BaseException:
                record["traceback"] = traceback.format_exc()
        record["stdout"], record["stderr"] = stdout.getvalue(), stderr.getvalue()
        results.append(record)
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
