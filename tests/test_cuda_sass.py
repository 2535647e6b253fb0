"""The machine code of the 16-bit attention kernels, read without a GPU (issue 13, item 6).

csrc/'s kernel files are compiled for sm_80 and sm_90 (tests/cuda_sass.py: nvcc -cubin,
cached under build/sass/), and each float16 / bfloat16 kernel of dsa_ops::masked_attention
(and, separately, of dsa_ops::attention_kl) must, in its own body (not counting the
__noinline__ subroutines it calls, where the scalar path for unaligned rows lives): spill
nothing to local memory and issue no 16-bit scalar global loads; and, when it runs
tensor-core MMAs, load tiles with cp.async (LDGSTS) or 128-bit global loads, feed the
MMAs with ldmatrix (LDSM) and issue no 16-bit scalar global stores (outputs leave in
16-byte chunks). The parser is tested on small synthetic listings, so its logic is
covered where the toolchain is absent; the same checks run on a built dsa_ops/_C*.so.
"""
from __future__ import annotations

import functools
import pathlib
import re
import shutil

import pytest

from tests import cuda_sass as sass

# ----------------------------------------------------------------------------- parser
# A kernel that calls one subroutine (which returns: RET) and "calls" its own epilogue
# (ptxas's CALL.REL.NOINC as a jump, to code ending in EXIT), then a second function; lines
# as cuobjdump 13 prints them for sm_90.
LISTING = """
	code for sm_90
		Function : _Z6kernelP6__half
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   HMMA.16816.F32 R12, R8, R10, R12 ;      /* 0x0000000a080c723c */
                                                                           /* 0x000fe20000000800 */
        /*0010*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;  /* 0x0000000004037fae */
        /*0020*/                   LDSM.16.M88.4 R8, [R3] ;                /* 0x000000000308783b */
        /*0030*/               @P0 CALL.REL.NOINC 0x90 ;                   /* 0x0000000000287944 */
        /*0040*/               @P1 CALL.REL.NOINC 0x70 ;                   /* 0x0000000000287944 */
        /*0050*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0060*/                   BRA 0x60;                               /* 0xfffffffc00fc7947 */
        /*0070*/                   LDG.E.128 R4, desc[UR4][R4.64] ;        /* 0x0000000404047981 */
        /*0080*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0090*/                   LDG.E.U16 R3, desc[UR6][R2.64] ;        /* 0x0000000602037981 */
        /*00a0*/                   STL [R1], R3 ;                          /* 0x0000000301007387 */
        /*00b0*/               @P2 BRA 0x90 ;                              /* 0x0000000301007387 */
        /*00c0*/                   RET.REL.NODEC R2 0x0 ;                  /* 0xfffffffc025c7950 */
		..........

		Function : _Z5otherv
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDG.E.U16.CONSTANT R0, desc[UR4][R2.64] ;   /* 0x0000000402007981 */
        /*0010*/              @!P1 LDL.LU R5, [R1+0x4] ;                  /* 0x0000040001057983 */
        /*0020*/                   LDG.E.64 R6, [R2.64] ;                  /* 0x0000000402067981 */
        /*0030*/                   EXIT ;                                  /* 0x000000000000794d */
"""


def test_parse_sass_splits_functions_and_reads_opcodes():
    functions = sass.parse_sass(LISTING)
    assert list(functions) == ["_Z6kernelP6__half", "_Z5otherv"]
    kernel = functions["_Z6kernelP6__half"]
    assert [i.address for i in kernel] == list(range(0, 0xd0, 0x10))
    assert kernel[1].opcode == "LDGSTS.E.BYPASS.128" and kernel[1].base == "LDGSTS"
    assert kernel[3].text == "@P0 CALL.REL.NOINC 0x90"
    other = functions["_Z5otherv"]
    assert other[0].modifiers == ("E", "U16", "CONSTANT")
    assert other[1].opcode == "LDL.LU"  # predicated: the guard is not the opcode


def test_a_fat_listing_is_split_by_architecture():
    fat = LISTING + LISTING.replace("code for sm_90", "code for sm_80").replace("_Z5otherv", "_Z1gv")
    by_arch = sass.parse_sass_by_arch("Fatbin elf code:\n" + fat)
    assert {arch: list(functions) for arch, functions in by_arch.items()} == {
        "sm_90": ["_Z6kernelP6__half", "_Z5otherv"], "sm_80": ["_Z6kernelP6__half", "_Z1gv"]}


def test_own_body_leaves_out_subroutines_and_keeps_calls_used_as_jumps():
    kernel = sass.parse_sass(LISTING)["_Z6kernelP6__half"]
    assert [i.address for i in sass.own_body(kernel)] == list(range(0, 0x90, 0x10))
    other = sass.parse_sass(LISTING)["_Z5otherv"]
    assert sass.own_body(other) == other  # no calls: everything is its own


def test_checks_pass_the_kernel_body_and_ignore_its_subroutine():
    kernel = sass.parse_sass(LISTING)["_Z6kernelP6__half"]
    for name in sass.CHECKS:
        assert sass.check(kernel, name) is None, name
    # The body's own vector load is the epilogue's (reached by a CALL used as a jump).
    without_cp_async = [i for i in kernel if i.base != "LDGSTS"]
    assert sass.check(without_cp_async, "cp_async_or_128bit_loads") is None


def test_checks_name_the_offending_instructions():
    other = sass.parse_sass(LISTING)["_Z5otherv"]
    # Without tensor-core MMAs nothing asks for ldmatrix or vector tile loads ...
    assert sass.check(other, "cp_async_or_128bit_loads") is None
    assert sass.check(other, "ldmatrix") is None
    # ... with one, both must be there.
    other = other + [sass.Instruction(0x40, "HMMA.16816.F32", "HMMA.16816.F32 R8, R4, R2, R8")]
    assert sass.check(other, "cp_async_or_128bit_loads") == (
        "missing cp.async (LDGSTS) or 128-bit global loads (LDG.E.128)")
    assert sass.check(other, "ldmatrix") == "missing ldmatrix (LDSM)"
    spills = sass.check(other, "no_spills")
    assert "1 found" in spills and "/*0010*/ @!P1 LDL.LU R5, [R1+0x4]" in spills
    loads = sass.check(other, "no_scalar_16bit_global_loads")
    assert "/*0000*/ LDG.E.U16.CONSTANT R0, desc[UR4][R2.64]" in loads
    assert "LDG.E.64" not in loads


@pytest.mark.parametrize("line, vector, scalar16", [
    ("LDG.E.128 R4, desc[UR4][R4.64]", True, False),
    ("LDG.E.128.CONSTANT R4, [R4.64]", True, False),
    ("LDGSTS.E.BYPASS.LTC128B.128 [R7], desc[UR4][R4.64]", True, False),
    ("LDG.E.64 R4, desc[UR4][R4.64]", False, False),
    ("LDG.E R4, desc[UR4][R4.64]", False, False),
    ("LDG.E.U16 R3, [R2.64]", False, True),        # sm_80 without descriptors
    ("LDG.E.S16 R3, desc[UR4][R2.64]", False, True),
    ("LD.E.U16 R3, [R2.64]", False, True),         # generic space
    ("LDS.U16 R3, [R2]", False, False),            # shared memory is not the question
    ("STG.E.U16 desc[UR4][R2.64], R3", False, False),
])
def test_load_classification(line, vector, scalar16):
    listing = (f"\t\tFunction : f\n        /*0000*/    {line} ;   /* 0x0 */\n"
               f"        /*0010*/    HMMA.16816.F32 R8, R4, R2, R8 ;   /* 0x0 */\n")
    instructions = sass.parse_sass(listing)["f"]
    assert (sass.check(instructions, "cp_async_or_128bit_loads") is None) == vector
    assert (sass.check(instructions, "no_scalar_16bit_global_loads") is not None) == scalar16


@pytest.mark.parametrize("line, scalar16", [
    ("STG.E.U16 desc[UR4][R2.64], R3", True),
    ("ST.E.U16 [R2.64], R3", True),                # generic space
    ("STG.E.128 desc[UR4][R2.64], R4", False),
    ("STG.E desc[UR4][R2.64], R3", False),         # float32 (the partial dQ / dK workspace)
    ("STS.U16 [R2], R3", False),                   # shared memory: the staging itself
])
def test_store_classification(line, scalar16):
    listing = (f"\t\tFunction : f\n        /*0000*/    {line} ;   /* 0x0 */\n"
               f"        /*0010*/    HMMA.16816.F32 R8, R4, R2, R8 ;   /* 0x0 */\n")
    instructions = sass.parse_sass(listing)["f"]
    assert (sass.check(instructions, "no_scalar_16bit_global_stores") is not None) == scalar16
    # A kernel without MMAs (the sums of the partials) is not asked.
    assert sass.check(instructions[:1], "no_scalar_16bit_global_stores") is None


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kIiEvv' for 'sm_90'
ptxas info    : Function properties for _Z1kIiEvv
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 121.498 ms
ptxas info    : Function properties for _ZN12_GLOBAL__N_16helperEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z1jv' for 'sm_90'
ptxas info    : Function properties for _Z1jv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers, 368 bytes cmem[0]
"""


def test_ptxas_report_lists_entries_with_their_resources():
    entries = sass.parse_ptxas(PTXAS)
    assert entries == {
        "_Z1kIiEvv": sass.Resources(registers=168, stack_bytes=8, spill_store_bytes=4,
                                    spill_load_bytes=8, static_smem_bytes=16),
        "_Z1jv": sass.Resources(registers=38),
    }


def _kernel(name: str, source: str = "masked_attention/forward.cu") -> sass.Kernel:
    return sass.Kernel(source, "sm_90", "_Z", name, sass.Resources(), [])


def test_sixteen_bit_kernels_are_selected_by_namespace_and_template_argument():
    names = [
        "void dsa_ops::masked_attention::(anonymous namespace)::forward_kernel<__half, 64>"
        "(dsa_ops::masked_attention::ForwardLaunch)",
        "void dsa_ops::masked_attention::key_kernel<__nv_bfloat16, 32, 128>(int)",
        "void dsa_ops::masked_attention::forward_kernel<float, 64>(int)",
        "void dsa_ops::masked_attention::rows_kernel<__half2>(int)",
        "void dsa_ops::attention_kl::(anonymous namespace)::kl_dq_kernel<__half, 16>(int)",
        "void dsa_ops::other::forward_kernel<__half, 64>(int)",
        "dsa_ops::partition_indices_kernel(int const*)",
    ]
    kernels = [_kernel(n) for n in names]
    attention = sass.sixteen_bit_kernels(kernels, "masked_attention")
    assert [sass.short_name(k) for k in attention] == ["forward_kernel<__half, 64>",
                                                       "key_kernel<__nv_bfloat16, 32, 128>"]
    kl = sass.sixteen_bit_kernels(kernels, "attention_kl")
    assert [sass.short_name(k) for k in kl] == ["kl_dq_kernel<__half, 16>"]
    assert sass.short_name(kernels[-1]) == "partition_indices_kernel"


def test_spills_reported_by_ptxas_fail_even_without_local_memory_instructions():
    kernel = _kernel("void dsa_ops::masked_attention::forward_kernel<__half, 64>(int)")
    kernel.instructions = sass.parse_sass(LISTING)["_Z6kernelP6__half"]
    assert sass.failures([kernel], "no_spills") == []
    kernel.resources.spill_store_bytes = 4
    (failure,) = sass.failures([kernel], "no_spills")
    assert failure.startswith("sm_90 masked_attention/forward.cu forward_kernel<__half, 64>:")
    assert "ptxas: 4 bytes spill stores" in failure


def test_nvcc_flags_are_setup_pys():
    setup = (sass.ROOT / "setup.py").read_text()
    flags = re.search(r'"nvcc": \[([^\]]*)\]', setup).group(1)
    assert tuple(re.findall(r'"([^"]+)"', flags)) == sass.NVCC_FLAGS


def test_kernel_files_include_no_torch_headers():
    # The standalone compile needs none; the bindings are the only code that sees ATen.
    for source in sass.kernel_sources(sass.CSRC):
        for header in _local_includes(source):
            text = header.read_text()
            assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), header


# What each directory of csrc/ may include: the shared layers, and an op only itself.
SHARED_LAYERS = {"device": {"device", "emulation"}, "common": {"common", "device"},
                 "emulation": {"emulation", "device"}}


def test_op_directories_include_only_the_shared_layers_and_themselves():
    """csrc/device/ (kernel layer) and csrc/common/ (bindings layer) are shared; an op
    directory (partition/, masked_attention/, attention_kl/) includes them and its own
    headers, never another op's."""
    found = []
    for path in sorted(sass.CSRC.glob("**/*")):
        if path.suffix not in (".cu", ".cuh", ".cpp", ".h"):
            continue
        directory = path.relative_to(sass.CSRC).parts[0]
        allowed = SHARED_LAYERS.get(directory, {directory, "device", "common"})
        for name in re.findall(r'#include\s*"([^"]+)"', path.read_text()):
            if "/" in name and name.split("/")[0] not in allowed:
                found.append(f"{path.relative_to(sass.CSRC)} includes {name}")
    assert not found, "\n".join(found)
    ops = {p.parent.name for p in sass.CSRC.glob("*/bindings.cpp")}
    assert ops == {"partition", "masked_attention", "attention_kl"}
    assert not (sass.CSRC / "bindings.cpp").exists(), "each op registers its own kernels"


def _local_includes(source: pathlib.Path, seen: set | None = None) -> set[pathlib.Path]:
    seen = set() if seen is None else seen
    if source in seen:
        return seen
    seen.add(source)
    for name in re.findall(r'#include\s*"([^"]+)"', source.read_text()):
        for base in (source.parent, sass.CSRC):
            if (base / name).is_file():
                _local_includes((base / name).resolve(), seen)
                break
    return seen


# ----------------------------------------------------------------------------- toolchain
needs_toolchain = pytest.mark.skipif(sass.missing_tools() is not None,
                                     reason=f"SASS needs nvcc, cuobjdump (Triton's wheel) and "
                                            f"c++filt: {sass.missing_tools()}")


@pytest.fixture(scope="module")
def kernels():
    return sass.build()


def _selected(kernels, family: str, arch: str) -> list[sass.Kernel]:
    return [k for k in sass.sixteen_bit_kernels(kernels, family) if k.arch == arch]


# Kernel templates that run no MMA by design: Δ and the sums of partials are elementwise.
NO_MMA_KERNELS = {"delta_kernel", "reduce_kernel"}
_KERNEL_DEFINITION = re.compile(
    r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")


def kernel_templates(family: str) -> set[str]:
    """The names of the __global__ kernels defined in csrc/<family>/."""
    return {name for path in sorted((sass.CSRC / family).glob("*.cu*"))
            for name in _KERNEL_DEFINITION.findall(path.read_text())}


def test_kernel_templates_are_found_in_the_sources():
    assert kernel_templates("masked_attention") == {"forward_kernel", "delta_kernel", "key_kernel",
                                                   "reduce_kernel"}
    assert kernel_templates("attention_kl") == {"kl_forward_kernel", "kl_dq_kernel",
                                               "kl_dk_kernel"}


@needs_toolchain
@pytest.mark.parametrize("arch", sass.ARCHS)
def test_every_attention_kernel_has_tensor_core_instantiations_for_both_dtypes(kernels, arch):
    """The checks below would pass vacuously if the kernels were missing or ran no MMAs: every
    kernel template of each family (but the elementwise ones) is built for float16 and
    bfloat16 (each dtype in its own instantiation file) and runs tensor-core MMAs."""
    for family in sass.FAMILIES:
        found = {(sass.short_name(k).split("<")[0], dtype) for k in _selected(kernels, family, arch)
                 if sass.runs_tensor_core_mma(k)
                 for dtype in ("__half", "__nv_bfloat16") if f"<{dtype}" in k.name}
        expected = kernel_templates(family) - NO_MMA_KERNELS
        assert found == {(name, d) for name in expected for d in ("__half", "__nv_bfloat16")}


@needs_toolchain
@pytest.mark.parametrize("check_name", list(sass.CHECKS))
@pytest.mark.parametrize("arch", sass.ARCHS)
@pytest.mark.parametrize("family", ["masked_attention", "attention_kl"])
def test_attention_kernels(kernels, family, arch, check_name):
    _assert_none_fail(sass.failures(_selected(kernels, family, arch), check_name), check_name)


def _assert_none_fail(found: list[str], check_name: str, shown: int = 12) -> None:
    if found:
        more = f"\n... and {len(found) - shown} more" if len(found) > shown else ""
        pytest.fail(f"{len(found)} kernels fail {check_name}:\n" + "\n".join(found[:shown]) + more,
                    pytrace=False)


@pytest.mark.skipif(sass.find_cuobjdump() is None or shutil.which("c++filt") is None,
                    reason="needs cuobjdump (Triton's wheel) and c++filt")
@pytest.mark.parametrize("check_name", list(sass.CHECKS))
def test_built_extension_masked_attention_kernels(check_name):
    """What make test's build (setup.py, TORCH_CUDA_ARCH_LIST) actually ships, when built."""
    libraries = sorted((sass.ROOT / "dsa_ops").glob("_C*.so"))
    if not libraries:
        pytest.skip("no built extension (dsa_ops/_C*.so)")
    kernels = _built_kernels(libraries[0])
    selected = sass.sixteen_bit_kernels(kernels, "masked_attention")
    assert selected, f"no 16-bit masked-attention kernels in {libraries[0]}"
    _assert_none_fail(sass.failures(selected, check_name), check_name)


@functools.cache
def _built_kernels(library: pathlib.Path) -> list[sass.Kernel]:
    return sass.built_extension_kernels(library)


def test_docs_table_block_is_replaced_between_the_markers():
    text = f"intro\n{sass.DOCS_BEGIN}\nold table\n{sass.DOCS_END}\noutro\n"
    updated = sass.docs_with_table(text, "| new |")
    assert updated == f"intro\n{sass.DOCS_BEGIN}\n| new |\n{sass.DOCS_END}\noutro\n"
    assert sass.documented_table(updated) == "| new |"


def test_summary_table_groups_instantiations_and_names_spills():
    kernels = [_kernel("void dsa_ops::masked_attention::forward_kernel<__half, 16, 64>(int)"),
               _kernel("void dsa_ops::masked_attention::forward_kernel<__nv_bfloat16, 64, 256>(int)"),
               _kernel("void dsa_ops::masked_attention::forward_kernel<float, 64, 64>(int)")]
    for kernel, registers in zip(kernels, (160, 254, 168)):
        kernel.resources.registers = registers
    kernels[2].resources.spill_store_bytes, kernels[2].resources.spill_load_bytes = 8, 4
    rows = sass.summary_table(kernels, "12.8, V12.8.93").splitlines()
    assert rows[0].startswith("ptxas of CUDA 12.8, V12.8.93") and "3 kernel instantiations" in rows[0]
    assert rows[4:] == [
        "| masked_attention | `forward_kernel` | 16-bit | 2 | 160–254 | 0 | none |",
        "| masked_attention | `forward_kernel` | float32 | 1 | 168 | 0 | 8/4 (float, 64, 64, sm_90) |"]


@needs_toolchain
def test_docs_kernels_table_is_current(kernels):
    """docs/kernels.md's resource table is what the current sources compile to."""
    text = sass.DOCS.read_text()
    recorded = re.search(r"ptxas of CUDA (.+?), setup\.py", sass.documented_table(text))
    release = sass.nvcc_release(sass.find_nvcc())
    if recorded is None or recorded.group(1) != release:
        pytest.skip(f"the table records another nvcc ({recorded and recorded.group(1)}) than "
                    f"this one ({release}): register counts differ between releases")
    assert sass.documented_table(text) == sass.summary_table(kernels, release), (
        "docs/kernels.md's kernels table is stale: python3 -m tests.cuda_sass --write-docs")
