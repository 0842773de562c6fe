"""The `moequant` command line, run as a user would (a subprocess), on a tiny Mixtral built offline."""
import json
import os
import subprocess
import sys

import pytest

FAST = ["--num-samples", "8", "--seq-len", "64", "--eval-tokens", "2048", "--eval-ctx", "128", "--quiet"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "moequant.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_quantize_agq_writes_checkpoint_and_table(tiny_mixtral_dir, tmp_path):
    out = tmp_path / "q"
    r = run("quantize", tiny_mixtral_dir, "--method", "agq", "--bits", "4", "--group-size", "32", "--out", str(out),
            *FAST)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "agq W4 g32" in r.stdout
    cfg = json.load(open(out / "config.json"))
    q = cfg["quantization_config"]
    assert q["quant_method"] == "moequant" and q["method"] == "agq" and q["bits"] == 4 and q["group_size"] == 32
    assert q["calibration"]["source"] == "text"
    assert os.path.isfile(out / "model.safetensors.index.json")
    # eval on the written checkpoint against the float model
    r = run("eval", str(out), "--ref", tiny_mixtral_dir, "--eval-tokens", "2048", "--eval-ctx", "128")
    assert r.returncode == 0, r.stderr
    assert "KL" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--bits", "5"], "bits=5 is not supported"),
    (["--group-size", "48"], "group size 48 does not divide"),
    (["--method", "awq"], "method 'awq' is not one of"),
])
def test_bad_settings_fail_with_one_line(tiny_mixtral_dir, tmp_path, args, needle):
    r = run("quantize", tiny_mixtral_dir, "--out", str(tmp_path / "x"), *FAST, *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_missing_model_folder(tmp_path):
    r = run("quantize", str(tmp_path / "nope"))
    assert r.returncode != 0 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_non_empty_output_needs_resume_or_overwrite(tiny_mixtral_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "f").write_text("x")
    r = run("quantize", tiny_mixtral_dir, "--method", "rtn", "--group-size", "32", "--out", str(out), *FAST)
    assert r.returncode != 0 and "--resume" in r.stderr
