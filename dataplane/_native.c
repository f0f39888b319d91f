/*
 * dataplane._native: the per-packet hot path of the data plane in C (issue 10, first cut).
 *
 * A pure function library: no sockets, threads or clocks. Each call takes a whole batch, takes references to its
 * input buffers and allocates its output objects while holding the GIL, then releases the GIL for all the
 * cryptography / summing, so that another thread (a second TUN queue, the event loop) can run meanwhile.
 *
 * dataplane/native_fallback.py is the pure-Python twin with the same API and byte-identical results; the
 * equivalence tests (tests/property/test_native_equivalence.py) hold the two together.
 *
 * WireGuard transport messages (type 4): 4 bytes type (4, 0, 0, 0), 4 bytes receiver index (little-endian),
 * 8 bytes counter (little-endian), then the ChaCha20-Poly1305 ciphertext of the padded packet and its 16-byte tag.
 * The nonce is 4 zero bytes followed by the counter bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define KEY_SIZE 32
#define HEADER_SIZE 16
#define TAG_SIZE 16
#define NONCE_SIZE 12
#define PADDING_MULTIPLE 16
/* The largest single AEAD input we hand to OpenSSL (its length arguments are int); far above any datagram. */
#define MAX_AEAD_INPUT (INT_MAX - 64)

static const unsigned char zero_padding[PADDING_MULTIPLE] = {0};

/* Buffers of a batch, acquired with the GIL held and released after it is re-taken. */
typedef struct {
    Py_buffer *views;
    Py_ssize_t acquired;
} BufferBatch;

static void buffer_batch_release(BufferBatch *batch) {
    for (Py_ssize_t i = 0; i < batch->acquired; i++) {
        PyBuffer_Release(&batch->views[i]);
    }
    PyMem_Free(batch->views);
    batch->views = NULL;
    batch->acquired = 0;
}

/* Acquire a contiguous read-only view of every item of ``items`` (a PySequence_Fast). -1 with an exception set. */
static int buffer_batch_acquire(BufferBatch *batch, PyObject *items) {
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    PyObject **objects = PySequence_Fast_ITEMS(items);
    batch->acquired = 0;
    batch->views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    if (batch->views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyObject_GetBuffer(objects[i], &batch->views[i], PyBUF_SIMPLE) < 0) {
            buffer_batch_release(batch);
            return -1;
        }
        batch->acquired++;
    }
    return 0;
}

static int get_key(PyObject *key_object, Py_buffer *key) {
    if (PyObject_GetBuffer(key_object, key, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (key->len != KEY_SIZE) {
        PyBuffer_Release(key);
        PyErr_SetString(PyExc_ValueError, "ChaCha20Poly1305 key must be 32 bytes");
        return -1;
    }
    return 0;
}

static inline void store_le64(unsigned char *out, uint64_t value) {
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
}

/* --- seal_batch -------------------------------------------------------------------------------------------------- */

/* One message: header, then the sealed packet and padding. 0 on success. Runs without the GIL. */
static int seal_one(EVP_CIPHER_CTX *ctx, const unsigned char *header_prefix, uint64_t counter,
                    const unsigned char *packet, Py_ssize_t size, Py_ssize_t padding, unsigned char *out) {
    unsigned char nonce[NONCE_SIZE] = {0};
    int written = 0;
    int final_written = 0;
    memcpy(out, header_prefix, 8);
    store_le64(out + 8, counter);
    memcpy(nonce + 4, out + 8, 8);
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) {
        return -1;
    }
    unsigned char *ciphertext = out + HEADER_SIZE;
    if (size && EVP_EncryptUpdate(ctx, ciphertext, &written, packet, (int)size) != 1) {
        return -1;
    }
    ciphertext += written;
    if (padding) {
        if (EVP_EncryptUpdate(ctx, ciphertext, &written, zero_padding, (int)padding) != 1) {
            return -1;
        }
        ciphertext += written;
    }
    if (EVP_EncryptFinal_ex(ctx, ciphertext, &final_written) != 1) {
        return -1;
    }
    ciphertext += final_written;
    if (ciphertext != out + HEADER_SIZE + size + padding) {
        return -1;
    }
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, ciphertext) == 1 ? 0 : -1;
}

PyDoc_STRVAR(seal_batch_doc,
             "seal_batch(key, receiver_index, first_counter, packets, mtu, /) -> list[bytes]\n\n"
             "Complete WireGuard transport messages for ``packets``, the i-th with counter first_counter + i.\n"
             "A non-empty packet is zero-padded to a multiple of 16 bytes, but never past ``mtu`` (None: no limit).");

static PyObject *seal_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "seal_batch takes 5 arguments");
        return NULL;
    }
    Py_buffer key;
    unsigned long receiver_index = PyLong_AsUnsignedLong(args[1]);
    if (receiver_index == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (receiver_index > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "receiver index must fit in 32 bits");
        return NULL;
    }
    unsigned long long first_counter = PyLong_AsUnsignedLongLong(args[2]);
    if (first_counter == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t mtu = -1;
    if (args[4] != Py_None) {
        mtu = PyLong_AsSsize_t(args[4]);
        if (mtu == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (mtu < 0) {
            mtu = 0;  /* max(mtu - size, 0) == 0 for every size */
        }
    }
    PyObject *packets = PySequence_Fast(args[3], "packets must be a sequence");
    if (packets == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(packets);
    if (count && first_counter + (unsigned long long)(count - 1) < first_counter) {
        Py_DECREF(packets);
        PyErr_SetString(PyExc_OverflowError, "counter does not fit in 64 bits");
        return NULL;
    }
    if (get_key(args[0], &key) < 0) {
        Py_DECREF(packets);
        return NULL;
    }
    BufferBatch batch;
    PyObject *result = NULL;
    Py_ssize_t *paddings = NULL;
    unsigned char **outputs = NULL;
    if (buffer_batch_acquire(&batch, packets) < 0) {
        goto done_key;
    }
    paddings = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_ssize_t));
    outputs = PyMem_Calloc(count ? (size_t)count : 1, sizeof(unsigned char *));
    result = PyList_New(count);
    if (paddings == NULL || outputs == NULL || result == NULL) {
        if (result == NULL) {
            PyErr_NoMemory();
        }
        Py_CLEAR(result);
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        goto done_batch;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t size = batch.views[i].len;
        Py_ssize_t padding = 0;
        if (size) {
            padding = (PADDING_MULTIPLE - size % PADDING_MULTIPLE) % PADDING_MULTIPLE;
            if (padding && mtu >= 0 && size + padding > mtu) {
                padding = mtu - size > 0 ? mtu - size : 0;
            }
        }
        if (size > MAX_AEAD_INPUT - padding) {
            PyErr_SetString(PyExc_OverflowError, "packet too large");
            Py_CLEAR(result);
            goto done_batch;
        }
        paddings[i] = padding;
        PyObject *message = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + size + padding + TAG_SIZE);
        if (message == NULL) {
            Py_CLEAR(result);
            goto done_batch;
        }
        outputs[i] = (unsigned char *)PyBytes_AS_STRING(message);
        PyList_SET_ITEM(result, i, message);
    }
    if (count) {
        unsigned char header_prefix[8] = {4, 0, 0, 0};
        for (int i = 0; i < 4; i++) {
            header_prefix[4 + i] = (unsigned char)(receiver_index >> (8 * i));
        }
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        if (ctx == NULL || EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key.buf, NULL) != 1) {
            failed = 1;
        }
        for (Py_ssize_t i = 0; !failed && i < count; i++) {
            failed = seal_one(ctx, header_prefix, first_counter + (unsigned long long)i, batch.views[i].buf,
                              batch.views[i].len, paddings[i], outputs[i]) != 0;
        }
        EVP_CIPHER_CTX_free(ctx);
        Py_END_ALLOW_THREADS
        if (failed) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 encryption failed");
            Py_CLEAR(result);
        }
    }
done_batch:
    PyMem_Free(paddings);
    PyMem_Free(outputs);
    buffer_batch_release(&batch);
done_key:
    PyBuffer_Release(&key);
    Py_DECREF(packets);
    return result;
}

/* --- open_batch -------------------------------------------------------------------------------------------------- */

/* 1 when the message authenticated (plaintext written to out), 0 when not. Runs without the GIL. */
static int open_one(EVP_CIPHER_CTX *ctx, const unsigned char *message, Py_ssize_t size, unsigned char *out) {
    unsigned char nonce[NONCE_SIZE] = {0};
    unsigned char tag[TAG_SIZE];
    int written = 0;
    int final_written = 0;
    Py_ssize_t body = size - HEADER_SIZE - TAG_SIZE;
    memcpy(nonce + 4, message + 8, 8);
    memcpy(tag, message + size - TAG_SIZE, TAG_SIZE);
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) {
        return 0;
    }
    if (body && EVP_DecryptUpdate(ctx, out, &written, message + HEADER_SIZE, (int)body) != 1) {
        return 0;
    }
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, tag) != 1) {
        return 0;
    }
    return EVP_DecryptFinal_ex(ctx, out + written, &final_written) == 1;
}

PyDoc_STRVAR(open_batch_doc,
             "open_batch(key, messages, /) -> list[bytes | None]\n\n"
             "The padded plaintext of each transport message (header fields other than the counter are not\n"
             "checked), or None where it does not authenticate (including messages shorter than 32 bytes).\n"
             "Replay is not checked: the caller reads the counters (bytes 8..16) and keeps that authority.");

static PyObject *open_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open_batch takes 2 arguments");
        return NULL;
    }
    PyObject *messages = PySequence_Fast(args[1], "messages must be a sequence");
    if (messages == NULL) {
        return NULL;
    }
    Py_buffer key;
    if (get_key(args[0], &key) < 0) {
        Py_DECREF(messages);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(messages);
    BufferBatch batch;
    PyObject *result = NULL;
    unsigned char **outputs = NULL;
    char *authenticated = NULL;
    if (buffer_batch_acquire(&batch, messages) < 0) {
        goto done_key;
    }
    outputs = PyMem_Calloc(count ? (size_t)count : 1, sizeof(unsigned char *));
    authenticated = PyMem_Calloc(count ? (size_t)count : 1, 1);
    result = PyList_New(count);
    if (outputs == NULL || authenticated == NULL || result == NULL) {
        Py_CLEAR(result);
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        goto done_batch;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t size = batch.views[i].len;
        if (size < HEADER_SIZE + TAG_SIZE || size - HEADER_SIZE > MAX_AEAD_INPUT) {
            /* Too short to carry a tag (or too long for OpenSSL): never authenticates. */
            Py_INCREF(Py_None);
            PyList_SET_ITEM(result, i, Py_None);
            continue;
        }
        PyObject *plaintext = PyBytes_FromStringAndSize(NULL, size - HEADER_SIZE - TAG_SIZE);
        if (plaintext == NULL) {
            Py_CLEAR(result);
            goto done_batch;
        }
        outputs[i] = (unsigned char *)PyBytes_AS_STRING(plaintext);
        PyList_SET_ITEM(result, i, plaintext);
    }
    if (count) {
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        if (ctx == NULL || EVP_DecryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key.buf, NULL) != 1) {
            failed = 1;
        }
        for (Py_ssize_t i = 0; !failed && i < count; i++) {
            if (outputs[i] != NULL) {
                authenticated[i] = (char)open_one(ctx, batch.views[i].buf, batch.views[i].len, outputs[i]);
            }
        }
        EVP_CIPHER_CTX_free(ctx);
        Py_END_ALLOW_THREADS
        if (failed) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 set-up failed");
            Py_CLEAR(result);
            goto done_batch;
        }
        for (Py_ssize_t i = 0; i < count; i++) {
            if (outputs[i] != NULL && !authenticated[i]) {
                Py_INCREF(Py_None);
                PyList_SetItem(result, i, Py_None);  /* drops the unauthenticated plaintext */
            }
        }
    }
done_batch:
    PyMem_Free(outputs);
    PyMem_Free(authenticated);
    buffer_batch_release(&batch);
done_key:
    PyBuffer_Release(&key);
    Py_DECREF(messages);
    return result;
}

/* --- ones_complement_sum ----------------------------------------------------------------------------------------- */

/* Buffers at least this long are summed without the GIL; below it the release costs more than it frees. */
#define CHECKSUM_GIL_RELEASE_SIZE 4096

/*
 * The sum of data's 32-bit words in host byte order (the last one zero-padded): 0 only when every byte is 0, and it
 * cannot overflow (2^32 words of at most 2^32 - 1 each). Host order lets the compiler vectorize the loop; the caller
 * turns it into the big-endian sum (RFC 1071 §2 B: byte order only rotates the folded sum).
 */
static uint64_t sum_host_words(const unsigned char *data, Py_ssize_t size) {
    uint64_t total = 0;
    Py_ssize_t whole = size & ~(Py_ssize_t)3;
    for (Py_ssize_t i = 0; i < whole; i += 4) {
        uint32_t word;
        memcpy(&word, data + i, 4);
        total += word;
    }
    if (whole < size) {
        unsigned char tail[4] = {0};
        memcpy(tail, data + whole, (size_t)(size - whole));
        uint32_t word;
        memcpy(&word, tail, 4);
        total += word;
    }
    return total;
}

/*
 * The number whose big-endian bytes are data (zero-padded to even length), modulo 0xFFFF. Since 2^16 = 1 (mod 0xFFFF),
 * a big-endian 32-bit word is congruent to the sum of its two 16-bit halves; on a little-endian host each half is
 * read byte-swapped, which is a multiplication by 2^8 modulo 0xFFFF, undone by multiplying by 2^8 once more.
 */
static uint64_t big_endian_value_mod_fold(uint64_t host_sum) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return host_sum % 0xFFFF;
#else
    return (host_sum % 0xFFFF) * 256 % 0xFFFF;
#endif
}

PyDoc_STRVAR(ones_complement_sum_doc,
             "ones_complement_sum(data, initial=0, /) -> int\n\n"
             "The folded 16-bit one's-complement sum of data (odd length padded with a zero byte) plus initial:\n"
             "0 only when both are zero, else in 1..0xFFFF. initial must be in 0..2**62.");

static PyObject *ones_complement_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "ones_complement_sum takes 1 or 2 arguments");
        return NULL;
    }
    unsigned long long initial = 0;
    if (nargs == 2) {
        int overflow = 0;
        long long value = PyLong_AsLongLongAndOverflow(args[1], &overflow);
        if (value == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (overflow || value < 0 || value > (1LL << 62)) {
            PyErr_SetString(PyExc_ValueError, "initial must be in 0..2**62");
            return NULL;
        }
        initial = (unsigned long long)value;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint64_t host_sum;
    if (data.len >= CHECKSUM_GIL_RELEASE_SIZE) {
        Py_BEGIN_ALLOW_THREADS
        host_sum = sum_host_words(data.buf, data.len);
        Py_END_ALLOW_THREADS
    } else {
        host_sum = sum_host_words(data.buf, data.len);
    }
    PyBuffer_Release(&data);
    if (host_sum == 0 && initial == 0) {
        return PyLong_FromLong(0);  /* the only way the exact sum is 0: all bytes and initial are 0 */
    }
    uint64_t folded = (big_endian_value_mod_fold(host_sum) + initial % 0xFFFF) % 0xFFFF;
    return PyLong_FromUnsignedLong(folded ? (unsigned long)folded : 0xFFFFUL);
}

/* --- module ------------------------------------------------------------------------------------------------------ */

static PyMethodDef native_methods[] = {
    {"seal_batch", (PyCFunction)(void (*)(void))seal_batch, METH_FASTCALL, seal_batch_doc},
    {"open_batch", (PyCFunction)(void (*)(void))open_batch, METH_FASTCALL, open_batch_doc},
    {"ones_complement_sum", (PyCFunction)(void (*)(void))ones_complement_sum, METH_FASTCALL,
     ones_complement_sum_doc},
    {NULL, NULL, 0, NULL},
};

static int native_exec(PyObject *module) {
    /* FIREZONE_NATIVE=0 asks for the pure-Python path; read here so that the sans-IO selector needs no os module. */
    const char *setting = getenv("FIREZONE_NATIVE");
    int disabled = setting != NULL && strcmp(setting, "0") == 0;
    if (PyModule_AddObjectRef(module, "disabled_by_environment", disabled ? Py_True : Py_False) < 0) {
        return -1;
    }
    return PyModule_AddStringConstant(module, "openssl_version", OpenSSL_version(OPENSSL_VERSION));
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dataplane._native",
    .m_doc = "Batch WireGuard transport sealing/opening and Internet checksums in C (GIL released per batch).",
    .m_size = 0,
    .m_methods = native_methods,
    .m_slots = native_slots,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&native_module); }
