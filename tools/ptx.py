"""PTX read and run for one thread: what a compiled kernel does at one launch, without a GPU.

The static kernel model (tools/kernel_model.py) needs to know which of a binary's code runs
at a given launch: the CUDA kernels hold every path in one instantiation (a row in registers,
across a cluster, streamed; 128-bit and scalar accesses; run-time dtypes), chosen at run time
by the launch parameters, and both backends' loops run a number of times that only the
launch decides. So instead of reading the code's structure, this module *runs* the PTX of one
thread (``trace``) with the launch's real parameter values (pointers at made-up addresses,
one region per tensor): integer arithmetic, predicates, branches, loops and the parameter,
local and address computations are exact; floating-point values and whatever is read from
global or shared memory are unknown (``None``). Every branch of these kernels depends on the
launch only (the layout, D, the flags, the thread's indices), never on data, so the trace is
the path the thread takes; a branch on an unknown value stops it with ``PtxError`` rather
than guess.

The result is the thread's sequence of global accesses (kind, width, address, hence tensor:
each access is attributed by the address it computes, exactly), prefetches, shuffles (the
row reductions) and barriers, in program order.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

# --------------------------------------------------------------------------- parsing

_TYPE_BITS = {
    "pred": 1,
    "b8": 8,
    "u8": 8,
    "s8": 8,
    "b16": 16,
    "u16": 16,
    "s16": 16,
    "f16": 16,
    "bf16": 16,
    "e4m3x2": 16,
    "e5m2x2": 16,
    "b32": 32,
    "u32": 32,
    "s32": 32,
    "f32": 32,
    "f16x2": 32,
    "bf16x2": 32,
    "tf32": 32,
    "b64": 64,
    "u64": 64,
    "s64": 64,
    "f64": 64,
    "b128": 128,
}
_FLOAT_TYPES = {"f16", "bf16", "f32", "f64", "f16x2", "bf16x2", "tf32", "e4m3x2", "e5m2x2"}
_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs"}
_FLOAT_COMPARISONS = {"equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan"}
_BOOL_OPS = {"and", "or", "xor"}

_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")
_LABEL = re.compile(r"^(\$?[A-Za-z_][\w$]*):(?!:)")
_GUARD = re.compile(r"^@(!?)(%[\w.]+)\s+")
_DECLARATION = re.compile(
    r"\.(shared|local)\s+(?:\.align\s+(\d+)\s+)?\.\w+\s+([\w$]+)(?:\[(\d*)\])?"
)
_LINE_DIRECTIVE = re.compile(r"^\s*\.(loc|file)\b[^\n]*$", re.M)  # no semicolon ends them


class PtxError(RuntimeError):
    """The PTX could not be read, or the trace met something it does not model."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "u64", "u32", "f32", "b8" (a struct passed by value: an array of bytes)
    size: int  # bytes
    align: int


@dataclass(frozen=True)
class Operand:
    kind: str  # "reg" | "imm" | "sym" | "mem" | "vec" | "sink"
    name: str = ""  # the register or symbol
    value: int = 0  # immediate; the offset of "mem"
    parts: tuple = ()  # "vec": its operands; "mem": the base operand


@dataclass(frozen=True)
class Instruction:
    index: int
    opcode: str  # with every modifier, e.g. "ld.global.L1::evict_last.v4.b32"
    operands: tuple[Operand, ...]
    guard: Optional[str] = None  # a predicate register
    negated: bool = False  # @!%p
    text: str = ""

    @property
    def parts(self) -> list[str]:
        return self.opcode.split(".")


@dataclass
class Kernel:
    """One ``.entry`` of a PTX module."""

    name: str
    params: list[Param]
    instructions: list[Instruction]
    labels: dict[str, int]  # label -> index of the instruction after it
    shared: dict[str, int] = field(default_factory=dict)  # symbol -> bytes (0: extern)
    local: dict[str, int] = field(default_factory=dict)
    branch_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # brx.idx tables

    def param_bytes(self) -> int:
        end = 0
        for p in self.params:
            end = -(-end // p.align) * p.align + p.size
        return end


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return _LINE_DIRECTIVE.sub("", text)


def _parse_param(text: str) -> Param:
    """One ``.param`` declaration: ``.param .align 8 .b8 name[264]`` (a struct by value) or
    ``.param .u64 .ptr .global .align 1 name`` (the second .align is the pointee's)."""
    tokens = text.split()
    if not tokens or tokens[0] != ".param":
        raise PtxError(f"cannot read the parameter {text!r}")
    i, align = 1, None
    if tokens[i] == ".align":
        align, i = int(tokens[i + 1]), i + 2
    type_ = tokens[i].lstrip(".")
    m = re.fullmatch(r"([\w$]+)(?:\[(\d+)\])?", tokens[-1])
    if not m:
        raise PtxError(f"cannot read the parameter {text!r}")
    elem = max(1, _TYPE_BITS.get(type_, 8) // 8)
    size = elem * (int(m.group(2)) if m.group(2) else 1)
    return Param(m.group(1), type_, size, align or elem)


def _split_top_level(text: str) -> list[str]:
    """Operands separated by the commas outside braces and brackets."""
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    last = "".join(current).strip()
    if last:
        out.append(last)
    return out


def parse_immediate(text: str) -> Optional[int]:
    """An integer immediate, or a float one as its bit pattern (0f... / 0d... / 1.0)."""
    t = text.strip()
    try:
        if re.fullmatch(r"-?0[xX][0-9a-fA-F]+U?", t):
            return int(t.rstrip("U"), 16)
        if re.fullmatch(r"-?\d+U?", t):
            return int(t.rstrip("U"))
        if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", t):
            return int(t[2:], 16)
        if re.fullmatch(r"0[dD][0-9a-fA-F]{16}", t):
            return int(t[2:], 16)
        if re.fullmatch(r"-?\d+\.\d*(e[-+]?\d+)?", t):
            return struct.unpack("<I", struct.pack("<f", float(t)))[0]
    except ValueError:
        return None
    return None


def parse_operand(text: str) -> Operand:
    t = text.strip()
    if t.startswith("{"):
        return Operand("vec", parts=tuple(parse_operand(p) for p in _split_top_level(t[1:-1])))
    if t.startswith("["):
        inner = t[1:-1].replace(" ", "")
        m = re.fullmatch(r"([^+\-]+)(?:([+\-])(-?\w+))?", inner)
        if not m:
            raise PtxError(f"cannot read the address {t!r}")
        base, sign, off = m.groups()
        offset = 0
        if off is not None:
            value = parse_immediate(off)
            if value is None:
                raise PtxError(f"cannot read the address offset in {t!r}")
            offset = -value if sign == "-" else value
        return Operand("mem", value=offset, parts=(parse_operand(base),))
    if t == "_":
        return Operand("sink")
    if t.startswith("%"):
        return Operand("reg", name=t)
    value = parse_immediate(t)
    if value is not None:
        return Operand("imm", value=value)
    if t.startswith("!%"):  # a negated predicate operand (setp's third, selp...)
        return Operand("reg", name=t[1:], value=1)
    return Operand("sym", name=t)


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise PtxError("unbalanced braces in the PTX")


def parse_module(ptx: str) -> dict[str, Kernel]:
    """Every ``.entry`` of a PTX module, by name."""
    text = _strip_comments(ptx)
    kernels = {}
    for m in _ENTRY.finditer(text):
        name = m.group(1)
        close = text.index(")", m.end())
        declared = text[m.end() : close].strip()
        params = [_parse_param(p) for p in declared.split(",")] if declared else []
        body_start = text.index("{", close)
        body_end = _matching_brace(text, body_start)
        kernel = _parse_body(name, params, text[body_start + 1 : body_end])
        for d in _DECLARATION.finditer(text[: m.start()]):  # module-level (Triton's extern)
            space, _align, sym, count = d.groups()
            (kernel.shared if space == "shared" else kernel.local).setdefault(
                sym, int(count) if count else 0
            )
        kernels[name] = kernel
    return kernels


def _parse_body(name: str, params: list[Param], body: str) -> Kernel:
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    shared: dict[str, int] = {}
    local: dict[str, int] = {}
    tables: dict[str, tuple[str, ...]] = {}
    for statement in body.split(";"):
        s = statement.strip()
        while True:  # scope braces and labels before the statement
            if s[:1] in ("{", "}"):
                s = s[1:].lstrip()
                continue
            m = _LABEL.match(s)
            if m and not s.startswith("%"):
                label = m.group(1)
                rest = s[m.end() :].strip()
                if rest.startswith(".branchtargets"):
                    tables[label] = tuple(
                        x.strip() for x in rest[len(".branchtargets") :].split(",")
                    )
                    s = ""
                    break
                labels[label] = len(instructions)
                s = rest
                continue
            break
        if not s:
            continue
        if s.startswith("."):
            d = _DECLARATION.match(s)
            if d:
                space, _align, sym, count = d.groups()
                elem = 1
                size = elem * int(count) if count else 0
                (shared if space == "shared" else local)[sym] = size
            continue
        guard, negated = None, False
        g = _GUARD.match(s)
        if g:
            negated, guard = g.group(1) == "!", g.group(2)
            s = s[g.end() :]
        parts = s.split(None, 1)
        opcode = parts[0]
        operands = (
            tuple(parse_operand(o) for o in _split_top_level(parts[1])) if len(parts) > 1 else ()
        )
        instructions.append(
            Instruction(len(instructions), opcode, operands, guard, negated, " ".join(s.split()))
        )
    return Kernel(name, params, instructions, labels, shared, local, tables)


# --------------------------------------------------------------------------- the trace

# Made-up address space of a trace. Tensors get one region each (``tensor_base``); the other
# state spaces sit far below them, so an address says which region, hence which tensor, it
# falls in.
TENSOR_REGION_BITS = 40
FIRST_TENSOR_REGION = 16
PARAM_BASE = 1 << 36
LOCAL_BASE = 2 << 36
SHARED_BASE = 0x1000_0000  # 32-bit, as shared addresses are


def tensor_base(slot: int) -> int:
    """The address of tensor ``slot`` (0, 1, ...) in a trace."""
    return (FIRST_TENSOR_REGION + slot) << TENSOR_REGION_BITS


def tensor_slot(address: int) -> Optional[int]:
    slot = (address >> TENSOR_REGION_BITS) - FIRST_TENSOR_REGION
    return slot if slot >= 0 else None


@dataclass(frozen=True)
class Launch:
    """What one traced thread sees of its launch."""

    params: dict[str, bytes]  # each .param of the entry, its bytes as launched
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    thread: tuple[int, int, int] = (0, 0, 0)
    program: tuple[int, int, int] = (0, 0, 0)  # the block's index
    cluster: tuple[int, int, int] = (1, 1, 1)


@dataclass(frozen=True)
class Event:
    """One thing the thread did: a global access ("load", "store", "atomic", "prefetch",
    "async_copy"), a "shuffle" or a "barrier". ``address``: None when unknown; ``certain``:
    False when its predicate was unknown."""

    kind: str
    index: int  # the instruction
    bytes: int = 0
    address: Optional[int] = None
    certain: bool = True


@dataclass
class Trace:
    kernel: str
    events: list[Event]
    steps: int  # instructions executed
    executed: set[int]  # indices of the instructions that ran


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def _signed(value: int, bits: int) -> int:
    value &= _mask(bits)
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


_MEMORY_OPS = ("ld", "st", "atom", "red", "prefetch", "prefetchu", "cp")


def _space(parts: list[str]) -> str:
    for p in parts[1:]:
        base = p.split("::")[0]
        if base in ("global", "shared", "local", "param", "const"):
            return base
    return "generic"


def _vector_count(parts: list[str]) -> int:
    for p in parts:
        if p in ("v2", "v4", "v8"):
            return int(p[1])
    return 1


def _type_of(parts: list[str]) -> str:
    for p in reversed(parts):
        if p in _TYPE_BITS:
            return p
    return "b32"


def access_bytes(opcode: str) -> int:
    """Bytes one PTX memory instruction moves per thread: its vector count times its type
    (``ld.global.v4.b32`` 16, ``ld.global.b16`` 2, ``cp.async.cg.shared.global [..], [..], 16``
    takes its size from an operand, see the trace)."""
    parts = opcode.split(".")
    return _vector_count(parts) * max(1, _TYPE_BITS[_type_of(parts)] // 8)


class _Machine:
    def __init__(self, kernel: Kernel, launch: Launch, max_steps: int):
        self.k = kernel
        self.launch = launch
        self.max_steps = max_steps
        self.regs: dict[str, Optional[int]] = {}
        self.local: dict[int, Optional[int]] = {}  # byte address -> byte value
        self.events: list[Event] = []
        self.executed: set[int] = set()
        self.symbols: dict[str, int] = {}
        self.param_memory: dict[int, bytes] = {}  # region base -> bytes
        for i, p in enumerate(kernel.params):
            base = PARAM_BASE + (i << 20)
            self.symbols[p.name] = base
            data = launch.params.get(p.name)
            if data is None:
                raise PtxError(f"{kernel.name}: no value for its parameter {p.name}")
            if len(data) != p.size:
                raise PtxError(
                    f"{kernel.name}: parameter {p.name} is {p.size} bytes, given {len(data)}"
                )
            self.param_memory[base] = data
        offset = 0
        for sym, size in kernel.shared.items():
            self.symbols[sym] = SHARED_BASE + offset
            offset += -(-max(size, 16) // 16) * 16
        offset = 0
        for sym, size in kernel.local.items():
            self.symbols[sym] = LOCAL_BASE + offset
            offset += -(-max(size, 16) // 16) * 16

    # ------------------------------------------------------------------ values
    def special(self, name: str) -> Optional[int]:
        L = self.launch
        axis = {"x": 0, "y": 1, "z": 2}
        base, _, dim = name[1:].partition(".")
        d = axis.get(dim, 0)
        if base == "tid":
            return L.thread[d]
        if base == "ntid":
            return L.block[d]
        if base == "ctaid":
            return L.program[d]
        if base == "nctaid":
            return L.grid[d]
        if base == "laneid":
            return L.thread[0] % 32
        if base == "warpid":
            return L.thread[0] // 32
        if base == "cluster_ctarank":
            return L.program[0] % L.cluster[0]
        if base == "cluster_nctarank":
            return L.cluster[0] * L.cluster[1] * L.cluster[2]
        if base == "cluster_ctaid":
            return L.program[d] % L.cluster[d]
        if base == "cluster_nctaid":
            return L.cluster[d]
        if base == "clusterid":
            return L.program[d] // L.cluster[d]
        if base == "nclusterid":
            return L.grid[d] // L.cluster[d]
        if base == "is_explicit_cluster":
            return int(L.cluster != (1, 1, 1))
        return None  # %clock, %smid, %envreg...: not modelled

    def read(self, op: Operand) -> Optional[int]:
        if op.kind == "reg":
            name = op.name
            v = self.regs[name] if name in self.regs else self.special(name)
            if op.value and v is not None:  # !%p
                v = 1 - v
            return v
        if op.kind == "imm":
            return op.value
        if op.kind == "sym":
            return self.symbols.get(op.name)
        return None

    def write(self, op: Operand, value: Optional[int], bits: int) -> None:
        if op.kind == "reg":
            self.regs[op.name] = None if value is None else value & _mask(bits)
        elif op.kind == "vec":
            # a packed value split into its parts, low part first
            n = len(op.parts)
            part_bits = bits // n if n else bits
            for i, part in enumerate(op.parts):
                if part.kind == "reg":
                    self.regs[part.name] = (
                        None if value is None else (value >> (i * part_bits)) & _mask(part_bits)
                    )

    def destinations(self, ins: Instruction) -> list[Operand]:
        if not ins.operands:
            return []
        first = ins.operands[0]
        if first.kind == "vec":
            return [p for p in first.parts if p.kind == "reg"]
        return [first] if first.kind == "reg" else []

    def forget(self, ins: Instruction) -> None:
        for d in self.destinations(ins):
            self.regs[d.name] = None
        if ins.opcode.startswith(("setp", "shfl")) and ins.operands:
            first = ins.operands[0]
            if first.kind == "reg" and "|" in first.name:
                for n in first.name.split("|"):
                    self.regs[n] = None

    def address(self, op: Operand) -> Optional[int]:
        if op.kind != "mem":
            return self.read(op)
        base = self.read(op.parts[0])
        return None if base is None else base + op.value

    def memory_read(self, address: int, size: int, space: str) -> Optional[int]:
        if address >= PARAM_BASE and address < LOCAL_BASE:
            region = PARAM_BASE + ((address - PARAM_BASE) >> 20 << 20)
            data = self.param_memory.get(region)
            off = address - region
            if data is None or off + size > len(data) or off < 0:
                raise PtxError(f"{self.k.name}: parameter read outside its bytes at +{off}")
            return int.from_bytes(data[off : off + size], "little")
        if space == "local" or LOCAL_BASE <= address < tensor_base(0):
            out = 0
            for i in range(size):
                b = self.local.get(address + i)
                if b is None:
                    return None
                out |= b << (8 * i)
            return out
        return None

    def memory_write(self, address: int, value: Optional[int], size: int) -> None:
        if LOCAL_BASE <= address < tensor_base(0):
            for i in range(size):
                self.local[address + i] = None if value is None else (value >> (8 * i)) & 0xFF

    # ------------------------------------------------------------------ the loop
    def run(self) -> Trace:
        code = self.k.instructions
        pc, steps = 0, 0
        while pc < len(code):
            steps += 1
            if steps > self.max_steps:
                raise PtxError(f"{self.k.name}: more than {self.max_steps} instructions traced")
            ins = code[pc]
            self.executed.add(pc)
            guard: Optional[int] = 1
            if ins.guard is not None:
                g = self.regs.get(ins.guard)
                guard = None if g is None else (g ^ 1 if ins.negated else g)
            if guard == 0:
                pc += 1
                continue
            nxt = self.step(ins, guard is not None)
            if nxt == -1:
                break
            pc = pc + 1 if nxt is None else nxt
        return Trace(self.k.name, self.events, steps, self.executed)

    def jump(self, label: str) -> int:
        if label not in self.k.labels:
            raise PtxError(f"{self.k.name}: branch to an unknown label {label}")
        return self.k.labels[label]

    def step(self, ins: Instruction, certain: bool) -> Optional[int]:
        parts = ins.parts
        root = parts[0]
        if root in ("bra", "brx"):
            if not certain:
                raise PtxError(
                    f"{self.k.name}: the branch `{ins.text}` depends on a value the trace "
                    "does not know (data, not the launch)"
                )
            if root == "brx":
                idx = self.read(ins.operands[0])
                table = self.k.branch_targets.get(ins.operands[1].name)
                if idx is None or table is None:
                    raise PtxError(f"{self.k.name}: cannot follow `{ins.text}`")
                return self.jump(table[idx])
            return self.jump(ins.operands[0].name)
        if root in ("ret", "exit"):
            return -1
        if root == "trap":
            raise PtxError(f"{self.k.name}: the traced thread reaches a trap")
        if not certain:
            # an instruction under an unknown predicate: its results are unknown, its
            # accesses possible
            if root in _MEMORY_OPS:
                self.memory(ins, parts, certain=False)
            self.forget(ins)
            return None
        handler = _HANDLERS.get(root)
        if handler is None:
            self.forget(ins)  # a value the trace does not model (floats, special units)
            return None
        handler(self, ins, parts)
        return None

    def memory(self, ins: Instruction, parts: list[str], certain: bool = True) -> None:
        root = parts[0]
        space = _space(parts)
        if root in ("prefetch", "prefetchu"):
            address = self.address(ins.operands[-1])
            if self.is_global(space, address):
                self.events.append(Event("prefetch", ins.index, 0, address, certain))
            return
        if root == "cp":  # cp.async.*.shared.global [dst], [src], size
            if "async" in parts and len(ins.operands) >= 3:
                size = self.read(ins.operands[2]) or 0
                self.events.append(
                    Event("async_copy", ins.index, size, self.address(ins.operands[1]), certain)
                )
            return
        size = access_bytes(ins.opcode)
        if root == "ld":
            address = self.address(ins.operands[1])
            if space == "param":
                value = self.memory_read(address, size, space) if address is not None else None
                self.assign_loaded(ins, value, parts)
                return
            if self.is_global(space, address):
                self.events.append(Event("load", ins.index, size, address, certain))
                self.forget(ins)
                return
            if space == "local" or self.is_local(address):
                value = None
                if certain and address is not None:
                    value = self.memory_read(address, size, "local")
                self.assign_loaded(ins, value, parts)
                return
            self.forget(ins)  # shared or constant memory: values of other threads
            return
        if root == "st":
            address = self.address(ins.operands[0])
            if self.is_global(space, address):
                self.events.append(Event("store", ins.index, size, address, certain))
            elif (space == "local" or self.is_local(address)) and address is not None:
                value = self.read_vector(ins.operands[1], parts)
                self.memory_write(address, value if certain else None, size)
            return
        # atom / red
        address = self.address(ins.operands[1] if root == "atom" else ins.operands[0])
        if self.is_global(space, address):
            self.events.append(Event("atomic", ins.index, size, address, certain))
        self.forget(ins)

    def is_global(self, space: str, address: Optional[int]) -> bool:
        """A global access: in the global state space, or a generic address outside the
        shared, parameter and local windows (an unknown one counts: it is reported)."""
        if space == "global":
            return True
        if space != "generic":
            return False
        return address is None or address >= tensor_base(0)

    def is_local(self, address: Optional[int]) -> bool:
        return address is not None and LOCAL_BASE <= address < tensor_base(0)

    def is_shared(self, address: Optional[int]) -> bool:
        return address is not None and address < PARAM_BASE

    def read_vector(self, op: Operand, parts: list[str]) -> Optional[int]:
        if op.kind != "vec":
            return self.read(op)
        bits = _TYPE_BITS[_type_of(parts)]
        value = 0
        for i, p in enumerate(op.parts):
            v = self.read(p)
            if v is None:
                return None
            value |= (v & _mask(bits)) << (i * bits)
        return value

    def assign_loaded(self, ins: Instruction, value: Optional[int], parts: list[str]) -> None:
        t = _type_of(parts)
        bits = _TYPE_BITS[t]
        dest = ins.operands[0]
        if dest.kind == "vec":
            for i, p in enumerate(dest.parts):
                if p.kind == "reg":
                    self.regs[p.name] = (
                        None if value is None else (value >> (i * bits)) & _mask(bits)
                    )
            return
        if value is not None and t.startswith("s"):  # a signed load widens with its sign
            value = _signed(value, bits)
        self.write(dest, value, 64)


# --------------------------------------------------------------------------- instructions


def _bits_of(parts: list[str]) -> int:
    return _TYPE_BITS[_type_of(parts)]


def _is_float(parts: list[str]) -> bool:
    return _type_of(parts) in _FLOAT_TYPES


def _binary(fn: Callable[[int, int, int, bool], Optional[int]]):
    def handler(m: _Machine, ins: Instruction, parts: list[str]) -> None:
        if _is_float(parts):
            m.forget(ins)
            return
        t = _type_of(parts)
        bits = _TYPE_BITS[t]
        a, b = m.read(ins.operands[1]), m.read(ins.operands[2])
        m.write(ins.operands[0], fn(a, b, bits, t.startswith("s")), bits)

    return handler


def _arith(op: Callable[[int, int], int]):
    def fn(a, b, bits, signed):
        if a is None or b is None:
            return None
        if signed:
            return op(_signed(a, bits), _signed(b, bits))
        return op(a & _mask(bits), b & _mask(bits))

    return fn


def _div(a, b, bits, signed):
    if a is None or b is None or (b & _mask(bits)) == 0:
        return None
    if signed:
        a, b = _signed(a, bits), _signed(b, bits)
        q = abs(a) // abs(b)
        return q if (a < 0) == (b < 0) else -q
    return (a & _mask(bits)) // (b & _mask(bits))


def _rem(a, b, bits, signed):
    q = _div(a, b, bits, signed)
    if q is None:
        return None
    if signed:
        return _signed(a, bits) - q * _signed(b, bits)
    return (a & _mask(bits)) - q * (b & _mask(bits))


def _logic(op: str):
    def fn(a, b, bits, signed):
        # three-valued where one side decides: 0 & x = 0, all-ones | x = all-ones
        full = _mask(bits)
        if op == "and":
            if a == 0 or b == 0:
                return 0
            return None if a is None or b is None else a & b
        if op == "or":
            if (a is not None and a & full == full) or (b is not None and b & full == full):
                return full
            return None if a is None or b is None else a | b
        return None if a is None or b is None else a ^ b

    return fn


def _shift(direction: str):
    def fn(a, b, bits, signed):
        if a is None or b is None:
            return None
        n = b & 0xFFFFFFFF
        if direction == "l":
            return 0 if n >= bits else a << n
        if signed:
            return _signed(a, bits) >> min(n, bits - 1)
        return 0 if n >= bits else (a & _mask(bits)) >> n

    return fn


def _mov(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    bits = _bits_of(parts)
    dest, src = ins.operands[0], ins.operands[1]
    if src.kind == "vec":  # pack: low part first
        n = len(src.parts)
        part_bits = bits // n
        value = 0
        for i, p in enumerate(src.parts):
            v = m.read(p)
            if v is None:
                value = None
                break
            value |= (v & _mask(part_bits)) << (i * part_bits)
        m.write(dest, value, bits)
        return
    m.write(dest, m.read(src), bits)


def _mul(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    if _is_float(parts):
        m.forget(ins)
        return
    t = _type_of(parts)
    bits = _TYPE_BITS[t]
    signed = t.startswith("s")
    a, b = m.read(ins.operands[1]), m.read(ins.operands[2])
    c = m.read(ins.operands[3]) if parts[0] == "mad" else 0
    if a is None or b is None or c is None:
        m.forget(ins)
        return
    if signed:
        a, b = _signed(a, bits), _signed(b, bits)
    product = a * b
    if "wide" in parts:
        m.write(ins.operands[0], product + (_signed(c, 2 * bits) if signed else c), 2 * bits)
        return
    if "hi" in parts:
        m.write(ins.operands[0], (product >> bits) + c, bits)
        return
    m.write(ins.operands[0], product + c, bits)


def _setp(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    t = _type_of(parts)
    bits = _TYPE_BITS[t]
    cmp = next((p for p in parts[1:] if p in _COMPARISONS or p in _FLOAT_COMPARISONS), None)
    bool_op = next((p for p in parts[2:] if p in _BOOL_OPS), None)
    a, b = m.read(ins.operands[1]), m.read(ins.operands[2])
    result: Optional[int] = None
    if a is not None and b is not None and t not in _FLOAT_TYPES and cmp in _COMPARISONS:
        if t.startswith("s") and cmp in ("lt", "le", "gt", "ge"):
            a, b = _signed(a, bits), _signed(b, bits)
        else:
            a, b = a & _mask(bits), b & _mask(bits)
        result = int(
            {
                "eq": a == b,
                "ne": a != b,
                "lt": a < b,
                "le": a <= b,
                "gt": a > b,
                "ge": a >= b,
                "lo": a < b,
                "ls": a <= b,
                "hi": a > b,
                "hs": a >= b,
            }[cmp]
        )
    if bool_op is not None:
        c = m.read(ins.operands[3])
        result = _logic(bool_op)(result, c, 1, False)
    dest = ins.operands[0]
    names = dest.name.split("|") if dest.kind == "reg" else []
    if names:
        m.regs[names[0]] = result
    if len(names) > 1:
        m.regs[names[1]] = None if result is None else 1 - result


def _selp(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    p = m.read(ins.operands[3])
    a, b = m.read(ins.operands[1]), m.read(ins.operands[2])
    bits = _bits_of(parts)
    if p is None:
        m.write(ins.operands[0], a if a == b else None, bits)
    else:
        m.write(ins.operands[0], a if p else b, bits)


def _not(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    bits = _bits_of(parts)
    a = m.read(ins.operands[1])
    m.write(ins.operands[0], None if a is None else ~a, bits)


def _neg(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    if _is_float(parts):
        m.forget(ins)
        return
    a = m.read(ins.operands[1])
    m.write(ins.operands[0], None if a is None else -a, _bits_of(parts))


def _abs(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    if _is_float(parts):
        m.forget(ins)
        return
    bits = _bits_of(parts)
    a = m.read(ins.operands[1])
    m.write(ins.operands[0], None if a is None else abs(_signed(a, bits)), bits)


def _min_max(op):
    def fn(a, b, bits, signed):
        if a is None or b is None:
            return None
        if signed:
            a, b = _signed(a, bits), _signed(b, bits)
        else:
            a, b = a & _mask(bits), b & _mask(bits)
        return op(a, b)

    return fn


def _cvt(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    types = [p for p in parts[1:] if p in _TYPE_BITS]
    if len(types) < 2 or types[0] in _FLOAT_TYPES or types[1] in _FLOAT_TYPES:
        m.forget(ins)
        return
    to, frm = types[0], types[1]
    a = m.read(ins.operands[1])
    if a is not None:
        a = _signed(a, _TYPE_BITS[frm]) if frm.startswith("s") else a & _mask(_TYPE_BITS[frm])
    m.write(ins.operands[0], a, _TYPE_BITS[to])


def _identity(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    # cvta (generic <-> state-space addresses are one and the same in a trace), mapa (a peer
    # block's shared memory: its data is unknown anyway)
    m.write(ins.operands[0], m.read(ins.operands[1]), 64)


def _bfe(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    bits = _bits_of(parts)
    a, pos, length = (m.read(o) for o in ins.operands[1:4])
    if None in (a, pos, length):
        m.forget(ins)
        return
    pos, length = pos & 0xFF, length & 0xFF
    value = (a >> pos) & _mask(length) if length else 0
    if _type_of(parts).startswith("s") and length and value >> (length - 1) & 1:
        value -= 1 << length
    m.write(ins.operands[0], value, bits)


def _bfi(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    bits = _bits_of(parts)
    a, b, pos, length = (m.read(o) for o in ins.operands[1:5])
    if None in (a, b, pos, length):
        m.forget(ins)
        return
    pos, length = pos & 0xFF, length & 0xFF
    field_mask = _mask(length) << pos
    m.write(ins.operands[0], (b & ~field_mask) | ((a << pos) & field_mask), bits)


def _lop3(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    a, b, c, lut = (m.read(o) for o in ins.operands[1:5])
    if None in (a, b, c, lut):
        m.forget(ins)
        return
    out = 0
    for bit in range(32):
        i = ((a >> bit & 1) << 2) | ((b >> bit & 1) << 1) | (c >> bit & 1)
        out |= (lut >> i & 1) << bit
    m.write(ins.operands[0], out, 32)


def _popc(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    a = m.read(ins.operands[1])
    m.write(ins.operands[0], None if a is None else bin(a & _mask(_bits_of(parts))).count("1"), 32)


def _clz(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    bits = _bits_of(parts)
    a = m.read(ins.operands[1])
    m.write(ins.operands[0], None if a is None else bits - (a & _mask(bits)).bit_length(), 32)


def _event(kind: str):
    def handler(m: _Machine, ins: Instruction, parts: list[str]) -> None:
        m.events.append(Event(kind, ins.index))
        m.forget(ins)

    return handler


def _barrier(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    m.events.append(Event("barrier", ins.index))
    if parts[1:2] == ["red"]:
        m.forget(ins)


def _memory(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    m.memory(ins, parts)


def _nothing(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    return None


def _getctarank(m: _Machine, ins: Instruction, parts: list[str]) -> None:
    m.write(ins.operands[0], m.launch.program[0] % m.launch.cluster[0], 32)


_HANDLERS: dict[str, Callable[[_Machine, Instruction, list[str]], None]] = {
    "mov": _mov,
    "add": _binary(_arith(lambda a, b: a + b)),
    "sub": _binary(_arith(lambda a, b: a - b)),
    "mul": _mul,
    "mad": _mul,
    "div": _binary(_div),
    "rem": _binary(_rem),
    "and": _binary(_logic("and")),
    "or": _binary(_logic("or")),
    "xor": _binary(_logic("xor")),
    "not": _not,
    "cnot": _not,
    "neg": _neg,
    "abs": _abs,
    "min": _binary(_min_max(min)),
    "max": _binary(_min_max(max)),
    "shl": _binary(_shift("l")),
    "shr": _binary(_shift("r")),
    "setp": _setp,
    "selp": _selp,
    "cvt": _cvt,
    "cvta": _identity,
    "mapa": _identity,
    "bfe": _bfe,
    "bfi": _bfi,
    "lop3": _lop3,
    "popc": _popc,
    "clz": _clz,
    "getctarank": _getctarank,
    "ld": _memory,
    "st": _memory,
    "atom": _memory,
    "red": _memory,
    "prefetch": _memory,
    "prefetchu": _memory,
    "cp": _memory,
    "shfl": _event("shuffle"),
    "bar": _barrier,
    "barrier": _barrier,
    "fence": _nothing,
    "membar": _nothing,
    "call": lambda m, ins, parts: m.forget(ins),
}


def trace(kernel: Kernel, launch: Launch, max_steps: int = 2_000_000) -> Trace:
    """Run ``kernel`` for one thread of ``launch`` and return what it did."""
    return _Machine(kernel, launch, max_steps).run()


# --------------------------------------------------------------------------- static view


def global_accesses(kernel: Kernel) -> list[tuple[str, int]]:
    """``(kind, bytes)`` of every global memory instruction of the kernel's code, executed
    or not ("load", "store", "atomic"): what the SASS should hold as well (ptxas keeps each
    access's width; the tests compare)."""
    out = []
    for ins in kernel.instructions:
        parts = ins.parts
        root = parts[0]
        if root not in ("ld", "st", "atom", "red"):
            continue
        if _space(parts) != "global":
            continue
        kind = {"ld": "load", "st": "store"}.get(root, "atomic")
        out.append((kind, access_bytes(ins.opcode)))
    return out


def param_values(kernel: Kernel, values: list) -> dict[str, bytes]:
    """The bytes of each ``.param`` from Python values in order: ints (pointers, integers,
    in the parameter's width), floats (f32/f64), or bytes as they are."""
    if len(values) != len(kernel.params):
        raise PtxError(f"{kernel.name} takes {len(kernel.params)} parameters, given {len(values)}")
    out = {}
    for p, v in zip(kernel.params, values):
        if isinstance(v, (bytes, bytearray)):
            out[p.name] = bytes(v)
        elif isinstance(v, float) or p.type in ("f32", "f64"):
            out[p.name] = struct.pack("<f" if p.size == 4 else "<d", float(v))
        else:
            out[p.name] = (int(v) & _mask(8 * p.size)).to_bytes(p.size, "little")
    return out
