"""The project installs one import package, gptoss_serve: HF's `kernels` (which transformers asks users to
install for MXFP4) and our kernels/ folder live side by side, whatever the working directory.

The checkout's top-level folders have no `__init__.py`: with the checkout on sys.path (`python -m pytest` or `python`
run from its root puts it there) they are at most namespace portions, which every installed regular package of the
same name outranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.metadata as md, json
import kernels, gptoss_serve.kernels.paged_attention as ours
owners = md.packages_distributions()
print(json.dumps({
    "kernels_mark": getattr(kernels, "MARK", None),
    "kernels_version": md.version("kernels"),
    "kernels_owners": owners.get("kernels"),
    "ours": ours.__file__,
    "our_top_levels": sorted(name for name, dists in owners.items() if "gptoss-serve" in dists),
}))
"""


def fake_distribution(site: Path, name: str, version: str) -> None:
    """A minimal installed distribution, as pip lays one out: the package and its .dist-info."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text('MARK = "not gptoss-serve"\n')
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n{info.name}/METADATA,,\n")


@pytest.mark.parametrize("where", ["elsewhere", "checkout root"])
def test_hf_kernels_and_ours_import_side_by_side(tmp_path, where):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    fake_distribution(site, "kernels", "0.9.0")
    elsewhere.mkdir()
    # `python -c` puts its working directory first on sys.path, as `python -m pytest` does
    cwd = CHECKOUT if where == "checkout root" else elsewhere
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["kernels_mark"] == "not gptoss-serve"
    assert seen["kernels_version"] == "0.9.0"
    # transformers resolves `kernels` to its own distribution (another install of HF's kernels may be there too)
    assert set(seen["kernels_owners"]) == {"kernels"}
    assert Path(seen["ours"]).resolve() == CHECKOUT / "kernels" / "paged_attention.py"
    assert seen["our_top_levels"] == ["gptoss_serve"]  # no generic top-level name is ours
