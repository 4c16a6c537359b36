"""Float32 matrix products on the CPU with the bits of vLLM's oneDNN products, whose extra
rows cost less.

Why: a speculative step runs the target on each request's drafts as extra rows. On one core
vLLM's oneDNN product (`ops.onednn_mm`) reads the weight from memory and then spends the
multiply-adds of each extra row on top (measured on an AVX2 CPU: SmolLM2's lm_head 10.3 ms
for one row, 15.2 for five), so a verified draft cost almost what a decoded token does.
Here the weight is laid out once so that each block of `NR` output columns streams through
the core once while every row of the input is multiplied into it, the rows' multiply-adds
overlapping the reads of the next block (all of SmolLM2's products: one row 41.3 ms against
55.3 for oneDNN, five rows 56.5 against 80.0).

Exactness: vLLM's float32 oneDNN product on the CPU computes every output as a run of fused
multiply-adds over the reduction dimension in order, in blocks of `kblock` whose partial sums
are added in order (measured: bitwise, for every row count). The kernel does the same. Since
the same `kblock` need not hold on every CPU or oneDNN build, `replicate` tries candidates
against the layer's own oneDNN product and hands back a kernel only when the bits agree, so
greedy output stays token for token what vLLM computes.

Where it pays: CPUs with 256-bit vectors (AVX2, FMA) and no AVX-512. On a CPU with AVX-512
(measured on a Xeon with AMX) oneDNN's product already costs about the same for one to six
rows (all of SmolLM2's products: 41.4 ms for one row, 44.0 for six), the kernel's more from
four rows (47.7 to 50.9), and oneDNN's reduction order there differs for some layers;
`suits_host` says no.

The kernel is written in LLVM IR (llvmlite, which vLLM's numba brings along) and compiled
once per process for the host CPU: no compiler is needed at install time.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

VECTOR = 8  # float32 lanes of a 256-bit register
NR = 2 * VECTOR  # output columns per packed weight block
MR = 6  # input rows per register tile (12 accumulators + 2 weight vectors + 1 broadcast)
# Reduction block sizes tried against oneDNN, most likely first.
KBLOCK_CANDIDATES = (1024, 512, 2048, 256, 768)
# Row counts the reproduction is checked on: one row, a tile's remainder, full tiles, more.
CHECK_ROWS = (1, 2, MR - 1, MR, MR + 1, 2 * MR + 3)

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _ir(vector: int, columns: int, tile_rows: int) -> str:
    """LLVM IR of `linear(x, ldx, packed, K, blocks, out, ldo, kblock, M)`.

    For every block of `columns` output columns (packed weight: [K, columns] contiguous) and
    every tile of up to `tile_rows` input rows: accumulators start at zero for each
    `kblock` slice of K and gather `fma(x[m, k], w[k, n], acc)` for k in order; each
    slice's sums are added to the running total in order; the total is stored.
    """
    import llvmlite.ir as ir

    f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
    vec, fp = ir.VectorType(f32, vector), f32.as_pointer()
    per_row = columns // vector
    module = ir.Module(name="vllm_medusa_cpu_gemm")
    fma = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), name=f"llvm.fma.v{vector}f32")
    zero = ir.Constant(vec, [0.0] * vector)
    undef = ir.Constant(vec, ir.Undefined)
    broadcast = ir.Constant(ir.VectorType(i32, vector), [0] * vector)

    def vector_at(b: ir.IRBuilder, pointer: ir.Value, offset: int) -> ir.Value:
        """The pointer's vector, `offset` floats on (unaligned)."""
        return b.bitcast(b.gep(pointer, [ir.Constant(i64, offset)]), vec.as_pointer())

    def splat(b: ir.IRBuilder, scalar: ir.Value) -> ir.Value:
        return b.shuffle_vector(
            b.insert_element(undef, scalar, ir.Constant(i32, 0)), undef, broadcast
        )

    def tile(rows: int) -> ir.Function:
        """tile(x, ldx, block, K, out, ldo, kblock): `rows` rows times one packed block."""
        fn = ir.Function(
            module, ir.FunctionType(ir.VoidType(), [fp, i64, fp, i64, fp, i64, i64]), f"t{rows}"
        )
        fn.linkage = "internal"
        fn.attributes.add("alwaysinline")
        x, ldx, block, k_total, out, ldo, kblock = fn.args
        entry = fn.append_basic_block("entry")
        b = ir.IRBuilder(entry)
        slices = fn.append_basic_block("slices")
        b.branch(slices)
        b.position_at_end(slices)
        k0 = b.phi(i64)
        k0.add_incoming(ir.Constant(i64, 0), entry)
        totals = [b.phi(vec) for _ in range(rows * per_row)]
        for t in totals:
            t.add_incoming(zero, entry)
        end = b.add(k0, kblock)
        end = b.select(b.icmp_signed("<", end, k_total), end, k_total)
        head = b.block
        inner = fn.append_basic_block("inner")
        b.branch(inner)
        b.position_at_end(inner)
        k = b.phi(i64)
        k.add_incoming(k0, head)
        accs = [b.phi(vec) for _ in range(rows * per_row)]
        for a in accs:
            a.add_incoming(zero, head)
        w_row = b.gep(block, [b.mul(k, ir.Constant(i64, columns))])
        weights = [b.load(vector_at(b, w_row, v * vector), align=4) for v in range(per_row)]
        updated = []
        for i in range(rows):
            xs = splat(b, b.load(b.gep(x, [b.add(b.mul(ir.Constant(i64, i), ldx), k)])))
            updated += [b.call(fma, [xs, w, accs[i * per_row + v]]) for v, w in enumerate(weights)]
        k_next = b.add(k, ir.Constant(i64, 1))
        k.add_incoming(k_next, inner)
        for a, u in zip(accs, updated, strict=True):
            a.add_incoming(u, inner)
        sliced = fn.append_basic_block("sliced")
        b.cbranch(b.icmp_signed("<", k_next, end), inner, sliced)
        b.position_at_end(sliced)
        first = b.icmp_signed("==", k0, ir.Constant(i64, 0))
        summed = [b.select(first, u, b.fadd(t, u)) for t, u in zip(totals, updated, strict=True)]
        k0.add_incoming(end, sliced)
        for t, s in zip(totals, summed, strict=True):
            t.add_incoming(s, sliced)
        store = fn.append_basic_block("store")
        b.cbranch(b.icmp_signed("<", end, k_total), slices, store)
        b.position_at_end(store)
        for i in range(rows):
            out_row = b.gep(out, [b.mul(ir.Constant(i64, i), ldo)])
            for v in range(per_row):
                b.store(summed[i * per_row + v], vector_at(b, out_row, v * vector), align=4)
        b.ret_void()
        return fn

    tiles = {rows: tile(rows) for rows in range(1, tile_rows + 1)}
    fn = ir.Function(
        module,
        ir.FunctionType(ir.VoidType(), [fp, i64, fp, i64, i64, fp, i64, i64, i64]),
        name="linear",
    )
    x, ldx, packed, k_total, blocks, out, ldo, kblock, m_total = fn.args
    for pointer in (x, packed, out):
        pointer.add_attribute("noalias")
    entry = fn.append_basic_block("entry")
    b = ir.IRBuilder(entry)
    # Columns outer, rows inner: a block of the weight is read from memory once and stays in
    # cache for every tile of rows.
    columns_loop = fn.append_basic_block("columns")
    b.branch(columns_loop)
    b.position_at_end(columns_loop)
    blk = b.phi(i64)
    blk.add_incoming(ir.Constant(i64, 0), entry)
    block = b.gep(packed, [b.mul(blk, b.mul(k_total, ir.Constant(i64, columns)))])
    column = b.mul(blk, ir.Constant(i64, columns))
    rows_loop = fn.append_basic_block("rows")
    b.branch(rows_loop)
    b.position_at_end(rows_loop)
    m0 = b.phi(i64)
    m0.add_incoming(ir.Constant(i64, 0), columns_loop)
    left = b.sub(m_total, m0)
    x_tile = b.gep(x, [b.mul(m0, ldx)])
    out_tile = b.gep(out, [b.add(b.mul(m0, ldo), column)])
    full, rest, next_block = (fn.append_basic_block(n) for n in ("full", "rest", "next"))
    b.cbranch(b.icmp_signed(">=", left, ir.Constant(i64, tile_rows)), full, rest)
    b.position_at_end(full)
    b.call(tiles[tile_rows], [x_tile, ldx, block, k_total, out_tile, ldo, kblock])
    m_next = b.add(m0, ir.Constant(i64, tile_rows))
    m0.add_incoming(m_next, full)
    b.cbranch(b.icmp_signed("<", m_next, m_total), rows_loop, next_block)
    b.position_at_end(rest)
    switch = b.switch(left, next_block)
    for rows in range(1, tile_rows):
        case = fn.append_basic_block(f"rest{rows}")
        switch.add_case(ir.Constant(i64, rows), case)
        with b.goto_block(case):
            b.call(tiles[rows], [x_tile, ldx, block, k_total, out_tile, ldo, kblock])
            b.branch(next_block)
    b.position_at_end(next_block)
    blk_next = b.add(blk, ir.Constant(i64, 1))
    blk.add_incoming(blk_next, next_block)
    done = fn.append_basic_block("done")
    b.cbranch(b.icmp_signed("<", blk_next, blocks), columns_loop, done)
    b.position_at_end(done)
    b.ret_void()
    return str(module)


_KERNEL_TYPE = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,  # x [M, K], rows ldx apart
    ctypes.c_int64,  # ldx
    ctypes.c_void_p,  # packed weight [N / NR, K, NR]
    ctypes.c_int64,  # K
    ctypes.c_int64,  # N / NR
    ctypes.c_void_p,  # out [M, N], rows ldo apart
    ctypes.c_int64,  # ldo
    ctypes.c_int64,  # kblock
    ctypes.c_int64,  # M
)


@functools.cache
def suits_host() -> bool:
    """The host has vector fused multiply-adds (instructions, not library calls) and no
    AVX-512, whose oneDNN products are as cheap for a few rows as for one."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return bool(features.get("fma") or features.get("neon")) and not features.get("avx512f")


@functools.cache
def _kernel() -> Callable[..., None]:
    """The kernel compiled for this CPU (once per process; the engine is kept alive here)."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    module = llvm.parse_assembly(_ir(VECTOR, NR, MR))
    module.verify()
    passes = llvm.create_pass_builder(
        machine, llvm.create_pipeline_tuning_options(speed_level=3, size_level=0)
    )
    passes.getModulePassManager().run(module, passes)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    kernel = _KERNEL_TYPE(engine.get_function_address("linear"))
    kernel._engine = engine  # the machine code lives as long as its engine
    return kernel


@dataclass(frozen=True)
class PackedLinear:
    """y = x @ weight.T (+ bias) with the weight packed for the kernel."""

    packed: torch.Tensor  # [N / NR, K, NR] float32
    kblock: int

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """weight: [N, K] float32 with N a multiple of NR -> [N / NR, K, NR]."""
        n, k = weight.shape
        return weight.detach().reshape(n // NR, NR, k).transpose(1, 2).contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # an opaque op in the graph
            return torch.ops.vllm_medusa.packed_linear(x, self.packed, self.kblock, bias)
        # Eagerly the op's dispatch alone would cost more than a small layer's product.
        return _packed_linear(x, self.packed, self.kblock, bias)


def _packed_linear(
    x: torch.Tensor,  # [..., K] float32
    packed: torch.Tensor,  # [N / NR, K, NR]
    kblock: int,
    bias: torch.Tensor | None,  # [N]
) -> torch.Tensor:  # [..., N]
    blocks, k, columns = packed.shape
    rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    m, n = rows.shape[0], blocks * columns
    out = torch.empty(m, n, dtype=torch.float32)
    if m:
        _kernel()(rows.data_ptr(), k, packed.data_ptr(), k, blocks, out.data_ptr(), n, kblock, m)
    if bias is not None:
        out += bias
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


@torch.library.custom_op("vllm_medusa::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, kblock: int, bias: torch.Tensor | None
) -> torch.Tensor:
    return _packed_linear(x, packed, kblock, bias)


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, kblock: int, bias: torch.Tensor | None):
    return x.new_empty(*x.shape[:-1], packed.shape[0] * packed.shape[2])


def replicate(
    weight: torch.Tensor, bias: torch.Tensor | None, reference: Linear
) -> PackedLinear | None:
    """The packed form of `weight` whose products are bitwise `reference`'s (vLLM's product
    for the layer, called as `reference(x, weight, bias)`), or None when none is: another
    dtype, a shape the packing does not take, or a reduction order not reproduced here."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[0] % NR:
        return None
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(m, weight.shape[1], generator=generator) for m in CHECK_ROWS]
    expected = [reference(x, weight, bias) for x in inputs]
    packed = PackedLinear.pack(weight)
    for kblock in KBLOCK_CANDIDATES:
        candidate = PackedLinear(packed, kblock)
        if all(torch.equal(candidate(x, bias), y) for x, y in zip(inputs, expected, strict=True)):
            return candidate
    return None
