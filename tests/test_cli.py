import json
import subprocess
import sys

from ofa.cli import main


def test_check_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    for label in ("smallest", "random", "largest"):
        assert label in out


def test_spaces_json(capsys):
    assert main(["spaces", "--json"]) == 0
    names = [s["name"] for s in json.loads(capsys.readouterr().out)]
    assert "mbv3-imagenet" in names and "mbv3-small-images" in names


def test_bad_arguments_name_the_allowed_values():
    r = subprocess.run([sys.executable, "-m", "ofa", "check", "--space", "nope"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice: 'nope'" in r.stderr and "mbv3-imagenet" in r.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["import-reference", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "none.pth" in capsys.readouterr().err
