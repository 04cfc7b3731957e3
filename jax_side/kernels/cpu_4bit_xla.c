/* XLA's binding of qbridge's CPU 4-bit decode: jax_side's NF4 / FP4 decode on the CPU, as an XLA FFI handler.
 *
 * The decode itself is qb_dequantize_4bit (torch_side/kernels/cpu_4bit.c: one C kernel for both sides,
 * compiled together with this file by jax_side/_cpu_kernel.py against jaxlib's FFI headers); see that file
 * for the values it writes (bitsandbytes' CUDA kernels' bits: a float32 product flushed below FLT_MIN,
 * rounded once to the output type; a nested absmax decoded with its two float32 roundings).
 *
 * Operands, in order, per weight (checked here; jax_side checks them first and names the weight):
 *   packed   uint8[ceil(n / 2)]          two values per byte, the high nibble first
 *   absmax   float32[ceil(n / blocksize)], or uint8 codes of a nested absmax (then three more operands)
 *   code     float32[16]
 *   nested_code float32[256], nested_absmax float32[ceil(blocks / nested_blocksize)], offset float32[1]
 * Result: n elements of float32, bfloat16 or float16 per weight. Every operand and the result may hold a
 * batch of B weights one after the other (a vmapped decode: B = the result's elements / n), decoded in
 * turn. Attributes (int64): n, blocksize, nested_blocksize, threads (the most threads the kernel may use).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "xla/ffi/api/c_api.h"

int qb_dequantize_4bit(const uint8_t *packed, const float *absmax, const uint8_t *absmax_code,
                       const float *nested_code, const float *nested_absmax, int64_t nested_blocksize,
                       float offset, const float *code, int64_t n, int64_t blocksize, void *out, int kind,
                       int threads);

static XLA_FFI_Error *refuse(const XLA_FFI_CallFrame *frame, const char *message) {
    XLA_FFI_Error_Create_Args args;
    memset(&args, 0, sizeof args);
    args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
    args.message = message;
    args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
    return frame->api->XLA_FFI_Error_Create(&args);
}

/* The handler's answer to XLA's question at registration: the FFI version it was compiled against. */
static XLA_FFI_Error *describe(const XLA_FFI_CallFrame *frame) {
    XLA_FFI_Metadata_Extension *extension = (XLA_FFI_Metadata_Extension *)frame->extension_start;
    if (extension->extension_base.struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE ||
        extension->metadata->struct_size < XLA_FFI_Metadata_STRUCT_SIZE)
        return refuse(frame, "qbridge's CPU 4-bit kernel: XLA's FFI metadata is older than its headers");
    XLA_FFI_Api_Version version;
    memset(&version, 0, sizeof version);
    version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
    version.major_version = XLA_FFI_API_MAJOR;
    version.minor_version = XLA_FFI_API_MINOR;
    extension->metadata->api_version = version;
    extension->metadata->traits = 0;
    return NULL;
}

static int int_attr(const XLA_FFI_CallFrame *frame, const char *name, int64_t *value) {
    const size_t len = strlen(name);
    for (int64_t i = 0; i < frame->attrs.size; i++) {
        const XLA_FFI_ByteSpan *key = frame->attrs.names[i];
        if (key->len != len || memcmp(key->ptr, name, len) != 0) continue;
        if (frame->attrs.types[i] != XLA_FFI_AttrType_SCALAR) return 0;
        const XLA_FFI_Scalar *scalar = (const XLA_FFI_Scalar *)frame->attrs.attrs[i];
        if (scalar->dtype == XLA_FFI_DataType_S64) {
            *value = *(const int64_t *)scalar->value;
            return 1;
        }
        if (scalar->dtype == XLA_FFI_DataType_S32) {
            *value = *(const int32_t *)scalar->value;
            return 1;
        }
        return 0;
    }
    return 0;
}

static const XLA_FFI_Buffer *operand(const XLA_FFI_CallFrame *frame, int64_t i, XLA_FFI_DataType dtype) {
    if (i >= frame->args.size || frame->args.types[i] != XLA_FFI_ArgType_BUFFER) return NULL;
    const XLA_FFI_Buffer *buffer = (const XLA_FFI_Buffer *)frame->args.args[i];
    return buffer->dtype == dtype ? buffer : NULL;
}

static int64_t elements(const XLA_FFI_Buffer *buffer) {
    int64_t n = 1;
    for (int64_t d = 0; d < buffer->rank; d++) n *= buffer->dims[d];
    return n;
}

XLA_FFI_Error *qb_xla_dequantize_4bit(XLA_FFI_CallFrame *frame) {
    if (frame->extension_start != NULL && frame->extension_start->type == XLA_FFI_Extension_Metadata)
        return describe(frame);
    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
    if (frame->rets.size != 1 || frame->rets.types[0] != XLA_FFI_RetType_BUFFER)
        return refuse(frame, "qbridge's CPU 4-bit kernel returns one array");
    const XLA_FFI_Buffer *out = (const XLA_FFI_Buffer *)frame->rets.rets[0];
    const int kind = out->dtype == XLA_FFI_DataType_F32    ? 0
                     : out->dtype == XLA_FFI_DataType_BF16 ? 1
                     : out->dtype == XLA_FFI_DataType_F16  ? 2
                                                           : -1;
    if (kind < 0) return refuse(frame, "qbridge's CPU 4-bit kernel writes float32, bfloat16 or float16");
    int64_t n, blocksize, nested_blocksize, threads;
    if (!int_attr(frame, "n", &n) || !int_attr(frame, "blocksize", &blocksize) ||
        !int_attr(frame, "nested_blocksize", &nested_blocksize) || !int_attr(frame, "threads", &threads) ||
        n <= 0 || blocksize <= 0 || nested_blocksize <= 0 || threads <= 0)
        return refuse(frame, "qbridge's CPU 4-bit kernel needs positive int attributes n, blocksize, "
                             "nested_blocksize and threads");
    const int64_t batch = elements(out) / n, blocks = (n + blocksize - 1) / blocksize;
    const int nested = frame->args.size == 6;
    const XLA_FFI_Buffer *packed = operand(frame, 0, XLA_FFI_DataType_U8);
    const XLA_FFI_Buffer *absmax = operand(frame, 1, nested ? XLA_FFI_DataType_U8 : XLA_FFI_DataType_F32);
    const XLA_FFI_Buffer *code = operand(frame, 2, XLA_FFI_DataType_F32);
    const XLA_FFI_Buffer *nested_code = nested ? operand(frame, 3, XLA_FFI_DataType_F32) : NULL;
    const XLA_FFI_Buffer *nested_absmax = nested ? operand(frame, 4, XLA_FFI_DataType_F32) : NULL;
    const XLA_FFI_Buffer *offset = nested ? operand(frame, 5, XLA_FFI_DataType_F32) : NULL;
    const int64_t nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
    if (elements(out) != batch * n || (frame->args.size != 3 && !nested) || packed == NULL ||
        elements(packed) != batch * ((n + 1) / 2) || absmax == NULL || elements(absmax) != batch * blocks ||
        code == NULL || elements(code) != batch * 16 ||
        (nested && (nested_code == NULL || elements(nested_code) != batch * 256 || nested_absmax == NULL ||
                    elements(nested_absmax) != batch * nested_blocks || offset == NULL ||
                    elements(offset) != batch)))
        return refuse(frame, "qbridge's CPU 4-bit kernel: per weight, packed must be ceil(n / 2) uint8 bytes, "
                             "absmax ceil(n / blocksize) float32 scales (or uint8 codes with a 256-entry float32 "
                             "nested_code, its float32 nested_absmax and one float32 offset), code 16 float32 "
                             "entries");
    const int width = out->dtype == XLA_FFI_DataType_F32 ? 4 : 2;
    const int parts = (int)(threads < 64 ? threads : 64);
    for (int64_t b = 0; b < batch; b++) {
        const uint8_t *bytes = (const uint8_t *)packed->data + b * ((n + 1) / 2);
        const float *table = (const float *)code->data + b * 16;
        char *dest = (char *)out->data + b * n * width;
        if (nested)
            qb_dequantize_4bit(bytes, NULL, (const uint8_t *)absmax->data + b * blocks,
                               (const float *)nested_code->data + b * 256,
                               (const float *)nested_absmax->data + b * nested_blocks, nested_blocksize,
                               ((const float *)offset->data)[b], table, n, blocksize, dest, kind, parts);
        else
            qb_dequantize_4bit(bytes, (const float *)absmax->data + b * blocks, NULL, NULL, NULL, nested_blocksize,
                               0.0f, table, n, blocksize, dest, kind, parts);
    }
    return NULL;
}
