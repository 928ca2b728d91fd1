"""TMA reduce (`tensor_descriptor.atomic_add`) for Triton's CPU interpreter, which (Triton 3.6-3.9) has
descriptor loads and stores but not `create_descriptor_reduce`. The fused-dQ TMA backward of
kernels.flash_attention adds its dQ tiles that way; on sm_90 it compiles to
`cp.reduce.async.bulk.tensor ... .add` (tests/kernels/test_flash_attention.py checks the SASS for UTMAREDG).
This gives the interpreter that instruction's semantics: every element of the box is added into memory,
elements outside the tensor's bounds are dropped. Built from the interpreter's own descriptor addressing
(`materialize_pointers`) and float atomic add, so only the reduction kind is ours."""

from triton._C.libtriton import ir
from triton.runtime import interpreter


def _descriptor_reduce(self, kind, desc, value, indices):
    if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
        raise NotImplementedError(f"descriptor reduce {kind} (only ADD is emulated)")
    ptrs, mask = desc.materialize_pointers(indices)
    op = ir.ATOMIC_OP.FADD if desc.base.dtype.element_ty.is_floating() else ir.ATOMIC_OP.ADD
    self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)


def install() -> None:
    """Add the emulation unless this Triton's interpreter has its own."""
    if not hasattr(interpreter.InterpreterBuilder, "create_descriptor_reduce"):
        interpreter.InterpreterBuilder.create_descriptor_reduce = _descriptor_reduce
