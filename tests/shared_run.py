"""One of conftest.SHARED_RUNS in the background: `tune run` of the single-device recipe with the given arguments
into FOLDER/out, then FOLDER/record.json (written whole, then renamed into place) with its exit status, output
and seconds. Usage: python tests/shared_run.py FOLDER [tune run arguments ...]"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

folder, args = Path(sys.argv[1]), sys.argv[2:]
tune = str(Path(sys.executable).parent / "tune")
start = time.monotonic()
result = subprocess.run(
    [tune, "run", "lora_finetune_single_device.py", *args, f"output_dir={folder / 'out'}"],
    capture_output=True,
    text=True,
)
fields = {"args": result.args, "returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
fields["seconds"] = time.monotonic() - start
partial = folder / "record.json.partial"
partial.write_text(json.dumps(fields))
os.replace(partial, folder / "record.json")
