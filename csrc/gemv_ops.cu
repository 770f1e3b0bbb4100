// loraq._C's small-batch GEMV ops, in one translation unit (each compile against the torch
// headers takes minutes): torch.ops.loraq.int1_gemv_mma and torch.ops.loraq.sparse4x4_gemv.
#include "int1_gemv_mma_op.h"
#include "sparse4x4_gemv_op.h"
