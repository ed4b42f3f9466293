"""tools/sass_report.py's parser on a hand-written SASS listing (no CUDA tools needed)."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).parent.parent / "sass_report.py"

LISTING = """
        Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*0020*/                   HGMMA.64x32x16.F32.BF16 R152, gdesc[UR8], RZ, !UPT ;
        /*0030*/              @P0  BRA.U.ANY 0x10 ;
        /*0040*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0050*/                   FMUL R2, R2, R3 ;
        /*0060*/             @!P1  BRA 0x10 ;
        /*0070*/                   BRA 0x0 ;
        /*0080*/                   EXIT ;
        Function : _Z5otherv
        /*0000*/                   EXIT ;
"""


def _load():
    spec = importlib.util.spec_from_file_location("_sass_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_loop_is_the_innermost_backward_branch_around_the_wgmma():
    report = _load()
    funcs = report.functions(LISTING)
    assert list(funcs) == ["_Z6kernelv", "_Z5otherv"]
    kernel = funcs["_Z6kernelv"]
    assert [op for _, op, _ in kernel][:3] == ["MOV", "UIADD3", "HGMMA"]
    # 0x60 -> 0x10 is the innermost loop holding both HGMMAs; the uniform retry loop (BRA.U.ANY) and
    # the outer 0x70 -> 0x0 branch are not it.
    assert report.page_loops(kernel) == [(0x10, 0x60)]
    assert report.page_loops(funcs["_Z5otherv"]) == []


TWO_LOOPS = """
        Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R152, gdesc[UR8], RZ, !UPT ;
        /*0020*/             @!P1  BRA 0x10 ;
        /*0030*/                   FMUL R2, R2, R3 ;
        /*0040*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0050*/              @P2  BRA 0x40 ;
        /*0060*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0070*/              @P3  BRA 0x0 ;
        /*0080*/                   EXIT ;
"""


def test_each_warpgroups_loop_is_a_page_loop_of_its_own():
    # Each warpgroup has its own steady pair loop; the piece loop around
    # both (0x70 -> 0x0) holds an HGMMA of its own (a tail pair) but is not innermost.
    report = _load()
    kernel = report.functions(TWO_LOOPS)["_Z6kernelv"]
    assert report.page_loops(kernel) == [(0x10, 0x20), (0x40, 0x50)]
