"""The command line starts without the heavy libraries: `import mechsteer` imports no torch,
`mechsteer --help` no command module, and a command's --help or a refused config no transformers or
transformer-lens (they load with a model). Which modules are imported is checked, not how long it
takes (the seconds are bench/startup.py's)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mechsteer.cli.commands import COMMANDS
from mechsteer.core.lazy import lazy_exports, type_checking_imports

HEAVY = ("transformers", "transformer_lens", "datasets", "pandas", "matplotlib")
DEMO_YAML = Path(__file__).resolve().parents[2] / "experiments" / "organism-demo.yaml"


def imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import json, sys
        print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def cli_code(*argv: str) -> str:
    return f"""
        import contextlib, io
        from mechsteer.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main({list(argv)!r})
            except SystemExit:
                pass
    """


def test_import_mechsteer_imports_no_torch_and_the_api_loads_on_first_use():
    assert imported_after("import mechsteer").isdisjoint({"torch", *HEAVY})
    loaded = imported_after("import mechsteer; mechsteer.RunConfig; mechsteer.hybrid_generate")
    assert "torch" in loaded


def test_top_level_help_imports_no_command_module():
    loaded = imported_after(cli_code("--help"))
    assert loaded.isdisjoint({"torch", *HEAVY})


@pytest.mark.parametrize("command", sorted({spec.name for spec in COMMANDS}))
def test_a_commands_help_imports_no_model_library(command):
    assert imported_after(cli_code(command, "--help")).isdisjoint(HEAVY)


def test_a_refused_config_imports_no_model_library(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_YAML.read_text() + "\npolicy: nonsense\n")
    argv = ["run", "--config", str(bad), "--out", str(tmp_path / "out")]
    code = f"""
        import contextlib, io
        from mechsteer.cli import main
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            assert main({argv!r}) == 2
        assert "unknown policy 'nonsense'" in errors.getvalue(), errors.getvalue()
    """
    assert imported_after(code).isdisjoint(HEAVY)


def test_every_public_name_resolves_and_the_declaration_is_checked(tmp_path):
    import mechsteer

    assert set(type_checking_imports(Path(mechsteer.__file__).read_text())) == set(mechsteer.__all__)
    for name in mechsteer.__all__:
        assert getattr(mechsteer, name) is not None
    assert set(mechsteer.__all__) <= set(dir(mechsteer))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        mechsteer.nonexistent  # noqa: B018
    init = tmp_path / "init.py"
    init.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from json import dumps\n")
    with pytest.raises(ImportError, match=r"only in __all__ \['loads'\], only imported \['dumps'\]"):
        lazy_exports("json", str(init), ["loads"])
