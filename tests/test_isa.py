"""Instruction-set levels: detection, forcing and refusing a level, and a binary that runs on any x86-64."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import gptcpp
from gptcpp import _core


def run_python(code, **env):
    """Runs code in a fresh interpreter that imports this same gptcpp."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    e = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd="/")


def test_cpu_info_reports_detection_and_choice():
    info = gptcpp.cpu_info()
    assert info["isa"] in info["supported_isas"]
    assert info["supported_isas"][0] == "generic"
    assert set(info["supported_isas"]) <= set(_core.all_isas())
    if "avx512" in info["supported_isas"]:
        assert info["features"]["avx512f"] and info["features"]["avx512bw"]
    if "avx2" in info["supported_isas"]:
        assert info["features"]["avx2"] and info["features"]["fma"]


@pytest.mark.parametrize("level", _core.all_isas())
def test_forcing_a_level(level):
    r = run_python("import gptcpp; print(gptcpp.cpu_info()['isa'])", GPTCPP_ISA=level)
    if level in _core.cpu_info()["supported_isas"]:
        assert r.returncode == 0 and r.stdout.strip() == level, r.stderr
    else:
        assert r.returncode != 0 and "lacks" in r.stderr and "Traceback" in r.stderr


def test_a_missing_level_is_refused_with_a_clear_error():
    # GPTCPP_HIDE_ISA makes the CPU look as if it lacked the level, so this runs on any machine.
    r = run_python("import gptcpp", GPTCPP_ISA="avx512", GPTCPP_HIDE_ISA="avx512")
    assert r.returncode != 0
    assert "GPTCPP_ISA=avx512 asks for an instruction set this CPU lacks" in r.stderr
    r = run_python("import gptcpp; print(gptcpp.cpu_info()['supported_isas'])", GPTCPP_HIDE_ISA="avx2,avx512")
    assert r.stdout.strip() == "['generic']"
    r = run_python("from gptcpp import _core; _core.set_isa('avx2')", GPTCPP_HIDE_ISA="avx2")
    assert r.returncode != 0 and "this CPU cannot run the avx2 kernels" in r.stderr


def test_unknown_level_is_refused():
    r = run_python("import gptcpp", GPTCPP_ISA="sse9")
    assert r.returncode != 0 and "unknown instruction set level 'sse9'" in r.stderr


def test_only_the_isa_kernels_use_avx():
    """Everything but the per-level kernel functions (avx2 ... avx512-amx) is built for baseline x86-64: disassembling the
    module finds no VEX/EVEX instruction and no YMM/ZMM/mask register outside them."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("x86-64 Linux only")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed")
    so = _core.__file__
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True).stdout
    kernel_namespaces = tuple(f"::{level.replace('-', '_')}::" for level in _core.all_isas() if level != "generic")
    if not any(line.endswith(">:") and any(ns in line for ns in kernel_namespaces) for line in text.splitlines()):
        pytest.skip("the module was stripped: instructions cannot be attributed to functions")
    functions, offenders, current = 0, {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = m.group(1)
            functions += 1
            continue
        ins = re.match(r"^\s*[0-9a-f]+:\s+(\S+)\s*(.*)$", line)
        if not ins or current is None or any(ns in current for ns in kernel_namespaces):
            continue
        if ins.group(1).startswith("v") or re.search(r"%[yz]mm\d+|%k[0-7]\b", ins.group(2)):
            offenders.setdefault(current, line.strip())
    if functions < 100:
        pytest.skip("the module has no symbol table to attribute instructions to functions")
    assert not offenders, list(offenders.items())[:5]
