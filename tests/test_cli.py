"""The entry point's one-line errors: a full disk is named with its errno and the file, not a traceback."""
from __future__ import annotations

import errno

import pytest

from pipeline.cli import disk_full
from pipeline.errors import BadInput
from tests.conftest import mlflow_runs, run_cli, tiny_tokenize_overrides, tmpfs


def _raised(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        return e
    raise AssertionError("nothing was raised")


def test_disk_full_names_the_errno_and_the_file_through_wrapping_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "outputs" / "x" / "pretrain.ckpt" / "step-000010.ckpt.tmp"

    def torch_save():  # torch and Lightning re-raise the OSError as a RuntimeError
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt))
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    assert disk_full(_raised(torch_save)) == ("no space left on device (ENOSPC) writing "
                                              "outputs/x/pretrain.ckpt/step-000010.ckpt.tmp: free space there and rerun")

    def over_quota_while_reading():  # implicit chaining (__context__), inside a stage's own error
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/elsewhere/cache/shard.arrow")
        except OSError:
            raise BadInput("source 'web': cannot read web.jsonl as json: An error occurred")

    assert disk_full(_raised(over_quota_while_reading)).startswith(
        "disk quota exceeded (EDQUOT) writing /elsewhere/cache/shard.arrow")

    def copy_across_filesystems():  # shutil's copy names source and destination: the destination was written
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpab12", None, str(ckpt))

    assert "writing outputs/x/pretrain.ckpt/step-000010.ckpt.tmp:" in disk_full(_raised(copy_across_filesystems))

    def write_without_a_name():  # file.write() names no file: the free space of the output folders is shown
        raise OSError(errno.ENOSPC, "No space left on device")

    line = disk_full(_raised(write_without_a_name), {"paths.outputs_dir": str(tmp_path / "outputs" / "not-yet"),
                                                      "paths.cache_dir": str(tmp_path / "cache")})
    assert line.startswith("no space left on device (ENOSPC) in a write that names no file; paths.outputs_dir "
                           "outputs/not-yet has ") and " free of " in line
    assert "paths.cache_dir" not in line, "one place per filesystem"

    assert disk_full(_raised(lambda: open(tmp_path / "absent" / "file"))) is None, "ENOENT is not a full disk"
    assert disk_full(ValueError("bad")) is None


@pytest.mark.slow
def test_a_stage_on_a_full_disk_ends_in_one_line_naming_enospc(tmp_path, tracking_uri, experiment, data_dir):
    """tokenize with its outputs (and so the datasets cache) on a 1 MiB filesystem and the MLflow store elsewhere:
    one line naming ENOSPC and the full filesystem, no traceback."""
    with tmpfs(tmp_path / "small", "1m") as small:
        args = ["tokenize", f"paths.outputs_dir={small}", f"tracking.experiment={experiment}",
                f"tracking.artifact_location={tmp_path / 'artifacts'}", *tiny_tokenize_overrides(data_dir),
                "tokenizer.vocab_size=512"]
        proc = run_cli(*args, env={"MLFLOW_TRACKING_URI": tracking_uri})
        assert proc.returncode == 1, proc.stderr[-3000:]
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: tokenize: no space left on device (ENOSPC)") and \
            f"paths.outputs_dir {small} has " in line and "free of 1 MiB" in line, line
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        (run,) = mlflow_runs(tracking_uri, experiment)
        assert run.info.status == "FAILED"
