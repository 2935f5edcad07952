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
    modules = _imported_after("import trainer.predict, trainer.evaluate\n"
                              "print('training loop loaded:', 'trainer.train' in sys.modules)\n"
                              "import trainer.cli, trainer.train, trainer.data, trainer.compare")
    assert "loaded:" in modules and "False" in modules and "True" not in modules
    assert "torch" in modules
    assert "nibabel" not in modules and "joblib" not in modules


@pytest.mark.parametrize("group", ["builder.cli", "trainer.cli"])
def test_every_command_explains_itself(group: str) -> None:
    main = __import__(group, fromlist=["main"]).main
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and len(command.help or "") > 20, name
