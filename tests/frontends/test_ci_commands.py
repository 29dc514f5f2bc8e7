"""CI runs the README's commands as written: read from README.md at run time, never a copy that can drift."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_reads_the_commands_from_the_readme():
    printed = subprocess.run(["bash", str(ROOT / "ci" / "readme_commands.sh")], capture_output=True, text=True, check=True).stdout
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    assert printed == block
    assert "lora-harness verify --tp 2" in printed and "pytest -n auto --tp 2 --ep 2" in printed
    assert "--examples" not in printed  # the main job runs as a user runs it


def test_no_ci_script_carries_its_own_copy_of_the_commands():
    for script in [ROOT / ".ci" / "run", ROOT / "ci" / "test.sh"]:
        text = "\n".join(l for l in script.read_text().splitlines() if not l.lstrip().startswith("#"))
        assert "lora-harness verify" not in text and "pytest " not in text, script
    assert "ci/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "ci/readme_commands.sh" in (ROOT / "ci" / "test.sh").read_text()
