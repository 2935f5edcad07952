"""The builder installs without torch and the trainer without nibabel or joblib: check what each imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner


def _imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_builder_does_not_import_torch() -> None:
    modules = _imported_after("import builder.cli, builder.build, builder.synth, builder.inspect")
    assert "torch" not in modules and "nibabel" in modules


def test_trainer_does_not_import_nibabel_or_joblib_and_predict_needs_no_training_loop() -> None:
    # one interpreter (torch loads once): predict first, then everything else the trainer has
    modules = _imported_after("import trainer.commands.predict, trainer.commands.evaluate\n"
                              "print('training loop loaded:', 'trainer.training.loop' in sys.modules)\n"
                              "import trainer.cli, trainer.training.loop, trainer.data, trainer.commands.compare")
    assert "loaded:" in modules and "False" in modules and "True" not in modules
    assert "torch" in modules
    assert "nibabel" not in modules and "joblib" not in modules


@pytest.mark.parametrize("group", ["builder.cli", "trainer.cli"])
def test_every_command_explains_itself(group: str) -> None:
    main = __import__(group, fromlist=["main"]).main
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and len(command.help or "") > 20, name


def test_scoring_needs_no_torch() -> None:
    """The BraTS 2023 scores, the clean-up and the statistics score masks anywhere (numpy and scipy only)."""
    modules = _imported_after("import trainer.scoring, trainer.scoring.brats, trainer.scoring.cleanup, "
                              "trainer.scoring.statistics")
    assert "torch" not in modules and "scipy" in modules


#: The trainer's stages, lowest first: a module imports only from its own stage or the ones below it.
STAGES = (("errors", "outputs", "tasks", "config", "device"), ("scoring",), ("data",), ("training",), ("inference",),
          ("commands",), ("cli", "launch", "__main__"))


def test_no_stage_imports_one_above_it() -> None:
    import ast
    from pathlib import Path

    import trainer

    root = Path(trainer.__file__).parent
    stage_of = {name: level for level, names in enumerate(STAGES) for name in names}
    upward = []
    for path in root.rglob("*.py"):
        part = path.relative_to(root).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer."):
                target = node.module.split(".")[1]
                if stage_of[target] > stage_of[part]:
                    upward.append(f"{path.relative_to(root)} imports {node.module}")
    assert sorted(stage_of) == sorted({p.relative_to(root).parts[0].removesuffix(".py") for p in root.iterdir()
                                       if p.suffix == ".py" or p.is_dir() and (p / "__init__.py").exists()} - {"__init__"})
    assert upward == []


def test_the_package_root_is_the_public_api_and_loads_it_only_when_used() -> None:
    assert "torch" not in _imported_after("import trainer")
    import trainer

    for name in trainer.__all__:
        assert getattr(trainer, name).__name__ == name
    with pytest.raises(AttributeError):
        trainer.no_such_name  # noqa: B018
