"""The machine code of the CUDA kernels, without a GPU: compile csrc/ for real architectures,
read the SASS (cuobjdump, shipped in Triton's wheel) and ptxas's resource report.

    python3 -m tests.cuda_sass --table            # markdown: registers / spills / smem per kernel
    python3 -m tests.cuda_sass --write-docs       # the summary table of docs/kernels.md, rewritten
    python3 -m tests.cuda_sass --check-docs       # exit 1 when docs/kernels.md's table is stale
    python3 -m tests.cuda_sass --check            # the SASS checks of tests/test_cuda_sass.py
    python3 -m tests.cuda_sass --check --csrc DIR # the same for another copy of csrc/

Each kernel file (csrc/**/*.cu, no torch headers) is compiled alone with nvcc -cubin per
architecture and ``-Xptxas -v``, two at a time; ptxas reports and SASS listings are cached
under build/sass/<hash of csrc/, flags, archs and nvcc version>/, so a second run costs
nothing (about 1 minute of 2 cores when cold).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "sass"
ARCHS = ("sm_80", "sm_90")
# setup.py's nvcc flags (tests/test_cuda_sass.py checks they stay in step) and the C++
# standard torch's extension builder adds.
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__")
STANDARD_FLAGS = ("-std=c++17",)
JOBS = 2


# ----------------------------------------------------------------------------- tools
def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").is_file():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump() -> str | None:
    """$DSA_OPS_CUOBJDUMP, then Triton's wheel (found without importing triton), then the
    CUDA toolkit, then PATH."""
    candidates = [os.environ.get("DSA_OPS_CUOBJDUMP")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(os.path.join(location, "backends", "nvidia", "bin", "cuobjdump"))
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(nvcc), "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def missing_tools() -> str | None:
    """Why the SASS cannot be produced here (None when it can)."""
    missing = [name for name, path in (("nvcc", find_nvcc()), ("cuobjdump", find_cuobjdump()),
                                       ("c++filt", shutil.which("c++filt"))) if path is None]
    return f"{', '.join(missing)} not found" if missing else None


def demangle(names: list[str]) -> dict[str, str]:
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                            check=True)
    return dict(zip(names, result.stdout.splitlines()))


# ----------------------------------------------------------------------------- parsing
@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.U16.CONSTANT
    text: str    # the line as cuobjdump prints it, without the encoding comment

    @property
    def modifiers(self) -> tuple[str, ...]:
        return tuple(self.opcode.split(".")[1:])

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTRUCTION = re.compile(
    r"^\s*/\*(?P<address>[0-9a-f]{4,})\*/\s+(?P<body>(?:@!?U?P[T0-9]+\s+)?(?P<opcode>[A-Z][A-Z0-9_.]*)[^;]*);")


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """cuobjdump -sass output → {mangled function name: its instructions in address order}."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            current = functions.setdefault(match.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            body = re.sub(r"\s+", " ", match.group("body")).strip()
            current.append(Instruction(int(match.group("address"), 16), match.group("opcode"),
                                       body))
    return functions


def parse_sass_by_arch(text: str) -> dict[str, dict[str, list[Instruction]]]:
    """A listing of several cubins (a fat binary, a built extension) → {arch: parse_sass}."""
    chunks: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^\s*code for (sm_\w+)", line)
        if match:
            lines = chunks.setdefault(match.group(1), [])
        lines.append(line)
    return {arch: parse_sass("\n".join(chunk)) for arch, chunk in chunks.items()}


def _guarded(i: Instruction) -> bool:
    return i.text.startswith("@") and not i.text.startswith("@PT ")


def _target(i: Instruction) -> int | None:
    """The address a branch, call or BSSY names (its last hexadecimal operand)."""
    found = re.findall(r"\b0x([0-9a-f]+)\b", i.text.split(None, 1 + _guarded(i))[-1])
    return int(found[-1], 16) if found else None


def _reachable(instructions: list[Instruction], start: int) -> set[int]:
    """Addresses reached from ``start`` through fall-through and branches; a CALL falls
    through (its target is not followed)."""
    at = {i.address: n for n, i in enumerate(instructions)}
    seen: set[int] = set()
    work = [start]
    while work:
        address = work.pop()
        if address in seen or address not in at:
            continue
        seen.add(address)
        n = at[address]
        i = instructions[n]
        ends_flow = False
        if i.base in ("BRA", "JMP", "BSSY"):
            target = _target(i)
            if target is not None:
                work.append(target)
            # A branch whose only operand is its target, unguarded, always jumps.
            ends_flow = i.base != "BSSY" and not _guarded(i) and len(i.text.split(",")) == 1
        elif i.base in ("EXIT", "RET", "BRX", "JMX", "KILL"):
            ends_flow = not _guarded(i)
        if not ends_flow and n + 1 < len(instructions):
            work.append(instructions[n + 1].address)
    return seen


def own_body(instructions: list[Instruction]) -> list[Instruction]:
    """The kernel's own code, without the subroutines it calls (__noinline__ device
    functions, the slow paths of division and friends), which ptxas lays out in the
    kernel's section. A subroutine is a CALL target whose code returns (RET); ptxas also
    uses CALL.REL.NOINC as a plain jump inside the kernel (to code that ends in EXIT),
    which stays the kernel's. Everything not in a subroutine counts as the kernel's."""
    subroutines: set[int] = set()
    by_address = {i.address: i for i in instructions}
    for target in {_target(i) for i in instructions if i.base == "CALL"} - {None}:
        region = _reachable(instructions, target)
        if any(by_address[a].base == "RET" for a in region):
            subroutines |= region
    return [i for i in instructions if i.address not in subroutines]


# ----------------------------------------------------------------------------- checks
def _is_scalar_16bit_global_load(i: Instruction) -> bool:
    # LDG.E.U16 / .S16 (sm_80, sm_90; + .CONSTANT for read-only loads), and generic-space
    # LD of 16 bits, which is the same access when the compiler cannot prove the space.
    return i.base in ("LDG", "LD") and any(m in ("U16", "S16", "16") for m in i.modifiers)


def _is_scalar_16bit_global_store(i: Instruction) -> bool:
    # STG.E.U16 (sm_80, sm_90) and generic-space ST of 16 bits.
    return i.base in ("STG", "ST") and any(m in ("U16", "S16", "16") for m in i.modifiers)


def _is_vector_global_load(i: Instruction) -> bool:
    return i.base == "LDGSTS" or (i.base == "LDG" and "128" in i.modifiers)


def _is_tensor_core_mma(i: Instruction) -> bool:
    return i.base == "HMMA"


@dataclasses.dataclass(frozen=True)
class Check:
    wanted: str                            # what the message calls it
    matches: Callable[[Instruction], bool]
    must_be_present: bool                  # False: must be absent
    # Only for kernels that run tensor-core MMAs: how operands reach the MMAs means nothing
    # in a kernel without any (an elementwise reduction).
    mma_kernels_only: bool = False


CHECKS = {
    "cp_async_or_128bit_loads": Check("cp.async (LDGSTS) or 128-bit global loads (LDG.E.128)",
                                      _is_vector_global_load, True, mma_kernels_only=True),
    "ldmatrix": Check("ldmatrix (LDSM)", lambda i: i.base == "LDSM", True, mma_kernels_only=True),
    "no_spills": Check("no local-memory spills (STL / LDL)", lambda i: i.base in ("STL", "LDL"),
                       False),
    "no_scalar_16bit_global_loads": Check("no 16-bit scalar global loads (LDG.E.U16 / .S16)",
                                          _is_scalar_16bit_global_load, False),
    # Output strips leave through shared memory in 16-byte chunks (store_rows); asked of the
    # MMA kernels, whose accumulator layout would otherwise store element pairs as scalars
    # (the partial-dK reduction writes one element per thread by design).
    "no_scalar_16bit_global_stores": Check("no 16-bit scalar global stores (STG.E.U16)",
                                           _is_scalar_16bit_global_store, False,
                                           mma_kernels_only=True),
}


def check(instructions: list[Instruction], name: str, shown: int = 5) -> str | None:
    """None when the kernel body passes CHECKS[name], else what is wrong (with the first
    offending instructions)."""
    rule = CHECKS[name]
    body = own_body(instructions)
    if rule.mma_kernels_only and not any(_is_tensor_core_mma(i) for i in body):
        return None
    hits = [i for i in body if rule.matches(i)]
    if rule.must_be_present:
        return None if hits else f"missing {rule.wanted}"
    if not hits:
        return None
    lines = "\n".join(f"    /*{i.address:04x}*/ {i.text}" for i in hits[:shown])
    return f"{rule.wanted}: {len(hits)} found, first:\n{lines}"


def runs_tensor_core_mma(kernel: "Kernel") -> bool:
    return any(_is_tensor_core_mma(i) for i in own_body(kernel.instructions))


# ----------------------------------------------------------------------------- ptxas -v
@dataclasses.dataclass
class Resources:
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    static_smem_bytes: int = 0


def parse_ptxas(text: str) -> dict[str, Resources]:
    """ptxas -v output → {mangled entry (kernel) name: resources}; device functions that ptxas
    reports on their own are left out."""
    entries: dict[str, Resources] = {}
    current: Resources | None = None
    for line in text.splitlines():
        match = re.search(r"Compiling entry function '([^']+)'", line)
        if match:
            current = entries[match.group(1)] = Resources()
            continue
        match = re.search(r"Function properties for (\S+)", line)
        if match:
            current = entries.get(match.group(1))
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                          line)
        if match:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(
                int, match.groups())
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current.registers = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.static_smem_bytes = int(smem.group(1)) if smem else 0
    return entries


# ----------------------------------------------------------------------------- build
@dataclasses.dataclass
class Kernel:
    source: str          # relative to csrc/, e.g. masked_attention/forward.cu
    arch: str
    mangled: str
    name: str            # demangled
    resources: Resources
    instructions: list[Instruction]


def kernel_sources(csrc: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in csrc.glob("**/*.cu") if "emulation" not in p.relative_to(csrc).parts)


def cache_dir(csrc: pathlib.Path, archs: tuple[str, ...], nvcc: str) -> pathlib.Path:
    """build/sass/<hash>: every file of csrc/ (headers included), the flags, the archs and
    the compiler's version."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join([*NVCC_FLAGS, *STANDARD_FLAGS, *archs, version]).encode())
    for path in sorted(csrc.glob("**/*")):
        if path.is_file():
            digest.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes())
    return CACHE / digest.hexdigest()[:16]


def _artifact(out: pathlib.Path, csrc: pathlib.Path, source: pathlib.Path, arch: str,
              kind: str) -> pathlib.Path:
    """out/masked_attention__forward.cu.sm_90.<kind>"""
    return out / f"{str(source.relative_to(csrc)).replace(os.sep, '__')}.{arch}.{kind}"


def _compile(nvcc: str, cuobjdump: str, csrc: pathlib.Path, source: pathlib.Path, arch: str,
             out: pathlib.Path) -> None:
    sass_file = _artifact(out, csrc, source, arch, "sass")
    if sass_file.is_file():
        return
    cubin = _artifact(out, csrc, source, arch, "cubin")
    result = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, *STANDARD_FLAGS,
                             "-I", str(csrc), "-Xptxas", "-v", "-o", str(cubin), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for {arch}:\n{result.stderr[-4000:]}")
    _artifact(out, csrc, source, arch, "ptxas").write_text(result.stderr)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    # Written last and atomically: its presence marks the (source, arch) as done.
    partial = _artifact(out, csrc, source, arch, "sass.partial")
    partial.write_text(sass)
    os.replace(partial, sass_file)
    cubin.unlink()  # tens of MB with -lineinfo; the SASS is what is read


def _prune(keep: pathlib.Path, versions: int = 4) -> None:
    """Drops all but the most recently used cache versions (each is tens of MB)."""
    others = sorted((d for d in CACHE.iterdir() if d.is_dir() and d != keep),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for old in others[versions - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def build(csrc: pathlib.Path = CSRC, archs: tuple[str, ...] = ARCHS, jobs: int = JOBS) -> list[Kernel]:
    """Every kernel (entry function) of csrc/'s .cu files for each arch, compiling what the
    cache lacks (``jobs`` nvcc processes at a time)."""
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(missing_tools())
    csrc = pathlib.Path(csrc).resolve()
    out = cache_dir(csrc, archs, nvcc)
    out.mkdir(parents=True, exist_ok=True)
    out.touch()
    _prune(keep=out)
    sources = kernel_sources(csrc)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        # Largest first: the backward files dominate, start them before the small ones.
        tasks = sorted(((s, a) for s in sources for a in archs), key=lambda t: -t[0].stat().st_size)
        for future in [pool.submit(_compile, nvcc, cuobjdump, csrc, s, a, out) for s, a in tasks]:
            future.result()
    kernels: list[Kernel] = []
    for source in sources:
        for arch in archs:
            entries = parse_ptxas(_artifact(out, csrc, source, arch, "ptxas").read_text())
            functions = parse_sass(_artifact(out, csrc, source, arch, "sass").read_text())
            names = demangle(sorted(entries))
            for mangled in sorted(entries, key=names.get):
                kernels.append(Kernel(str(source.relative_to(csrc)), arch, mangled, names[mangled],
                                      entries[mangled], functions.get(mangled, [])))
    return kernels


def built_extension_kernels(library: pathlib.Path) -> list[Kernel]:
    """The kernels of a built extension (dsa_ops/_C*.so), for every arch it carries; no
    ptxas report there, so resources are left at zero (spills show as STL / LDL)."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError(missing_tools())
    listing = subprocess.run([cuobjdump, "-sass", str(library)], capture_output=True, text=True,
                             check=True).stdout
    kernels = []
    for arch, functions in sorted(parse_sass_by_arch(listing).items()):
        names = demangle(sorted(functions))
        for mangled, instructions in functions.items():
            kernels.append(Kernel(library.name, arch, mangled, names[mangled], Resources(),
                                  instructions))
    return kernels


# ----------------------------------------------------------------------------- selection
# The 16-bit attention kernels the SASS checks cover, by demangled name: every kernel of the
# namespace whose (first) template argument is __half or __nv_bfloat16.
FAMILIES = {
    "masked_attention": "dsa_ops::masked_attention::",
    "attention_kl": "dsa_ops::attention_kl::",
}
_SIXTEEN_BIT = re.compile(r"^(?:void )?(?P<namespace>dsa_ops::\w+::)(?:\(anonymous namespace\)::)?"
                          r"(?P<kernel>\w+)<(?P<dtype>__half|__nv_bfloat16)\b")


def sixteen_bit_kernels(kernels: list[Kernel], family: str) -> list[Kernel]:
    selected = []
    for kernel in kernels:
        match = _SIXTEEN_BIT.match(kernel.name)
        if match and match.group("namespace") == FAMILIES[family]:
            selected.append(kernel)
    return selected


def short_name(kernel: Kernel) -> str:
    """forward_kernel<__half, 64> (namespace and parameter list dropped)."""
    name = re.sub(r"\(anonymous namespace\)::", "", kernel.name)
    name = re.sub(r"^void ", "", name)
    name = name.split("(")[0]
    return re.sub(r"^dsa_ops::(?:\w+::)*", "", name)


def failures(kernels: list[Kernel], check_name: str) -> list[str]:
    """One line (and the offending instructions) per kernel that fails CHECKS[check_name];
    spills count whether the SASS shows them or ptxas reports them."""
    found = []
    for kernel in kernels:
        problems = [check(kernel.instructions, check_name) if kernel.instructions
                    else "no SASS for this kernel in cuobjdump's listing"]
        r = kernel.resources
        if check_name == "no_spills" and (r.spill_store_bytes or r.spill_load_bytes):
            problems.append(f"ptxas: {r.spill_store_bytes} bytes spill stores, "
                            f"{r.spill_load_bytes} bytes spill loads")
        problems = [p for p in problems if p]
        if problems:
            found.append(f"{kernel.arch} {kernel.source} {short_name(kernel)}: " + "; ".join(problems))
    return found


# ----------------------------------------------------------------------------- CLI
def table(kernels: list[Kernel]) -> str:
    lines = ["| kernel | file | arch | registers | spill stores / loads (bytes) | stack (bytes) "
             "| static smem (bytes) |", "|---|---|---|---:|---:|---:|---:|"]
    for kernel in sorted(kernels, key=lambda k: (k.source, short_name(k), k.arch)):
        r = kernel.resources
        lines.append(f"| `{short_name(kernel)}` | {kernel.source} | {kernel.arch} | {r.registers} | "
                     f"{r.spill_store_bytes} / {r.spill_load_bytes} | {r.stack_bytes} | "
                     f"{r.static_smem_bytes} |")
    return "\n".join(lines)


# docs/kernels.md carries summary_table() between these markers; --write-docs rewrites it and
# tests/test_cuda_sass.py checks it against the current sources (same nvcc release only:
# another ptxas allocates registers differently).
DOCS = ROOT / "docs" / "kernels.md"
DOCS_BEGIN = "<!-- generated: kernels table (python3 -m tests.cuda_sass --write-docs) -->"
DOCS_END = "<!-- end generated: kernels table -->"


def nvcc_release(nvcc: str) -> str:
    """'12.8, V12.8.93' from nvcc --version's last 'release' line."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return re.findall(r"release (.+)", version)[-1].strip()


def _dtype_class(kernel: Kernel) -> str:
    match = re.search(r"<([\w:]+)", short_name(kernel))
    first = match.group(1) if match else ""
    return {"__half": "16-bit", "__nv_bfloat16": "16-bit", "float": "float32"}.get(first, "-")


def _span(values: list[int]) -> str:
    return str(min(values)) if min(values) == max(values) else f"{min(values)}–{max(values)}"


def summary_table(kernels: list[Kernel], release: str) -> str:
    """Per kernel template and dtype class (16-bit, float32): the op directory, the number of
    instantiations, ptxas's register range per arch, static shared memory, and every
    instantiation that spills (bytes stored / loaded)."""
    archs = sorted({k.arch for k in kernels})
    groups: dict[tuple[str, str, str], list[Kernel]] = {}
    for kernel in kernels:
        template = short_name(kernel).split("<")[0]
        op = kernel.source.split("/")[0]
        groups.setdefault((op, template, _dtype_class(kernel)), []).append(kernel)
    lines = [f"ptxas of CUDA {release}, setup.py's nvcc flags, `-Xptxas -v`; "
             f"{len({(k.source, k.name) for k in kernels})} kernel instantiations.", "",
             "| op | kernel | dtypes | variants | " + " | ".join(f"registers {a}" for a in archs) +
             " | static smem (bytes) | spills (store/load bytes) |",
             "|---|---|---|---:|" + "---:|" * len(archs) + "---:|---|"]
    for (op, template, dtypes), members in sorted(groups.items()):
        by_arch = {a: [k for k in members if k.arch == a] for a in archs}
        registers = [_span([k.resources.registers for k in by_arch[a]]) if by_arch[a] else "-"
                     for a in archs]
        smem = _span([k.resources.static_smem_bytes for k in members])
        spills = [f"{k.resources.spill_store_bytes}/{k.resources.spill_load_bytes} "
                  f"({short_name(k).split('<', 1)[-1].rstrip('>')}, {k.arch})"
                  for k in sorted(members, key=lambda k: (short_name(k), k.arch))
                  if k.resources.spill_store_bytes or k.resources.spill_load_bytes]
        variants = len(by_arch[archs[0]])
        lines.append(f"| {op} | `{template}` | {dtypes} | {variants} | " + " | ".join(registers) +
                     f" | {smem} | {'; '.join(spills) or 'none'} |")
    return "\n".join(lines)


def docs_with_table(text: str, table_text: str) -> str:
    """``text`` (docs/kernels.md) with the block between the markers replaced."""
    begin, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    return text[:begin] + "\n" + table_text + "\n" + text[end:]


def documented_table(text: str) -> str:
    """The generated block of docs/kernels.md as it is committed."""
    return text[text.index(DOCS_BEGIN) + len(DOCS_BEGIN):text.index(DOCS_END)].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the ptxas resource table")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the generated table of docs/kernels.md")
    parser.add_argument("--check-docs", action="store_true",
                        help="exit 1 when docs/kernels.md's generated table is not current")
    parser.add_argument("--check", action="store_true", help="run the SASS checks, list failures")
    parser.add_argument("--csrc", type=pathlib.Path, default=CSRC, help="kernel sources (csrc/)")
    parser.add_argument("--arch", action="append", help="sm_80, sm_90 (default both)")
    args = parser.parse_args(argv)
    if not (args.table or args.check or args.write_docs or args.check_docs):
        parser.error("give --table, --write-docs, --check-docs and/or --check")
    reason = missing_tools()
    if reason:
        print(f"cuda_sass: {reason}", file=sys.stderr)
        return 2
    kernels = build(args.csrc, tuple(args.arch or ARCHS))
    if args.table:
        print(table(kernels))
    failed = 0
    if args.write_docs or args.check_docs:
        generated = summary_table(kernels, nvcc_release(find_nvcc()))
        if args.write_docs:
            DOCS.write_text(docs_with_table(DOCS.read_text(), generated))
            print(f"cuda_sass: wrote the kernels table of {DOCS.relative_to(ROOT)}")
        elif documented_table(DOCS.read_text()) != generated:
            print(f"cuda_sass: {DOCS.relative_to(ROOT)}'s kernels table is stale: "
                  "python3 -m tests.cuda_sass --write-docs", file=sys.stderr)
            failed += 1
    if args.check:
        for family in FAMILIES:
            selected = sixteen_bit_kernels(kernels, family)
            print(f"## {family}: {len(selected)} 16-bit kernel instantiations")
            for check_name in CHECKS:
                found = failures(selected, check_name)
                failed += len(found)
                print(f"- {check_name}: {'ok' if not found else f'{len(found)} FAIL'}")
                for line in found:
                    print("    " + line.replace("\n", "\n    "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
