/*
 * dataplane._native: the per-packet hot path of the data plane in C (issue 10): WireGuard transport sealing/opening,
 * Internet checksums, and the TUN packet transforms of dataplane/packet.py (TSO/USO split, write-side coalescing,
 * flow hash).
 *
 * A pure function library: no sockets, threads or clocks (each calling thread keeps AEAD contexts, a cache that no
 * result depends on). Each call takes a whole batch, takes references to its input buffers and allocates its output
 * objects while holding the GIL, then releases the GIL for all the cryptography / summing, so that another thread (a
 * second TUN queue, the event loop) can run meanwhile.
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
#include <pthread.h>
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

/* --- per-thread AEAD contexts ------------------------------------------------------------------------------------
 *
 * Setting up a context costs more than sealing a small packet: EVP_CIPHER_CTX_new, the provider's key set-up and, with
 * EVP_chacha20_poly1305(), an implicit fetch from the provider store on every call. For the lone packets of a ping or
 * an ACK that was most of the call (and after an idle pause, when all that code and data is out of the CPU caches,
 * 40 us instead of 20 us), so each thread keeps one context per direction, keyed on the last key it was given. The
 * cipher is fetched once. Contexts are freed, and the copy of the key cleansed, when their thread exits. */

typedef struct {
    EVP_CIPHER_CTX *ctx;
    int keyed; /* ctx holds ``key`` and is ready for a nonce */
    unsigned char key[KEY_SIZE];
} CachedContext;

typedef struct {
    CachedContext directions[2]; /* [0] opening, [1] sealing */
} ThreadContexts;

static pthread_once_t contexts_once = PTHREAD_ONCE_INIT;
static pthread_key_t contexts_key;
static int contexts_key_ok;
static EVP_CIPHER *fetched_cipher;

static void free_thread_contexts(void *pointer) {
    ThreadContexts *contexts = pointer;
    for (int i = 0; i < 2; i++) {
        EVP_CIPHER_CTX_free(contexts->directions[i].ctx);
        OPENSSL_cleanse(contexts->directions[i].key, KEY_SIZE);
    }
    free(contexts);
}

static void contexts_init(void) {
    contexts_key_ok = pthread_key_create(&contexts_key, free_thread_contexts) == 0;
    fetched_cipher = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
}

/* This thread's context for ``encrypt`` (1: seal, 0: open) set up with ``key``, or NULL. Runs without the GIL. */
static EVP_CIPHER_CTX *keyed_context(const unsigned char *key, int encrypt) {
    pthread_once(&contexts_once, contexts_init);
    if (!contexts_key_ok) {
        return NULL;
    }
    ThreadContexts *contexts = pthread_getspecific(contexts_key);
    if (contexts == NULL) {
        contexts = calloc(1, sizeof(*contexts));
        if (contexts == NULL || pthread_setspecific(contexts_key, contexts) != 0) {
            free(contexts);
            return NULL;
        }
    }
    CachedContext *cached = &contexts->directions[encrypt ? 1 : 0];
    if (cached->keyed && CRYPTO_memcmp(cached->key, key, KEY_SIZE) == 0) {
        return cached->ctx;
    }
    cached->keyed = 0;
    if (cached->ctx == NULL && (cached->ctx = EVP_CIPHER_CTX_new()) == NULL) {
        return NULL;
    }
    const EVP_CIPHER *cipher = fetched_cipher != NULL ? fetched_cipher : EVP_chacha20_poly1305();
    if (EVP_CipherInit_ex(cached->ctx, cipher, NULL, key, NULL, encrypt) != 1) {
        return NULL;
    }
    memcpy(cached->key, key, KEY_SIZE);
    cached->keyed = 1;
    return cached->ctx;
}

/* After a failure the context's state is unknown: set it up afresh on the next call. */
static void forget_context(int encrypt) {
    ThreadContexts *contexts = contexts_key_ok ? pthread_getspecific(contexts_key) : NULL;
    if (contexts != NULL) {
        contexts->directions[encrypt ? 1 : 0].keyed = 0;
    }
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
        EVP_CIPHER_CTX *ctx = keyed_context(key.buf, 1);
        failed = ctx == NULL;
        for (Py_ssize_t i = 0; !failed && i < count; i++) {
            failed = seal_one(ctx, header_prefix, first_counter + (unsigned long long)i, batch.views[i].buf,
                              batch.views[i].len, paddings[i], outputs[i]) != 0;
        }
        if (failed) {
            forget_context(1);
        }
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
        EVP_CIPHER_CTX *ctx = keyed_context(key.buf, 0);
        failed = ctx == NULL;
        for (Py_ssize_t i = 0; !failed && i < count; i++) {
            if (outputs[i] != NULL) {
                authenticated[i] = (char)open_one(ctx, batch.views[i].buf, batch.views[i].len, outputs[i]);
            }
        }
        if (failed) {
            forget_context(0);
        }
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

/* --- IP packets: TSO/USO split, flow hash ------------------------------------------------------------------------ */
/*
 * The twins are split_gso and flow_hash of dataplane/packet.py (the reference). These functions only handle inputs
 * they are sure about and return None for everything else (malformed frames, header fields out of range, buffers
 * they cannot read): the Python wrapper in dataplane/native.py then calls the pure function, so errors raise exactly
 * the reference's exceptions. Every read is bounds-checked against the buffer length first.
 */

#define FOLD 0xFFFFu
#define IPV4_HEADER_LEN 20
#define IPV6_HEADER_LEN 40
#define TCP_MIN_HEADER_LEN 20
#define UDP_HEADER_LEN 8
#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_UDP_L4 5
#define VNET_GSO_ECN 0x80
#define MAX_IP_PACKET 65535
/* Splits producing at least this many bytes run without the GIL; below it the release costs more than it frees. */
#define SPLIT_GIL_RELEASE_SIZE 4096

static inline unsigned load16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }
static inline uint32_t load32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void store16(unsigned char *p, unsigned value) {
    p[0] = (unsigned char)(value >> 8);
    p[1] = (unsigned char)value;
}
static inline void store32(unsigned char *p, uint32_t value) {
    p[0] = (unsigned char)(value >> 24);
    p[1] = (unsigned char)(value >> 16);
    p[2] = (unsigned char)(value >> 8);
    p[3] = (unsigned char)value;
}

/* The unfolded sum of big-endian 16-bit words of a short even-length header. */
static uint64_t header_sum(const unsigned char *p, Py_ssize_t size) {
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i + 1 < size; i += 2) {
        total += load16(p + i);
    }
    return total;
}

/* A checksum field from an unfolded sum: (-sum) mod 0xFFFF, i.e. 0..0xFFFE, as packet.py's ``(-(...)) % _FOLD``. */
static inline unsigned negated_fold(uint64_t sum) { return (unsigned)((FOLD - sum % FOLD) % FOLD); }

/* virtio_net_hdr fields, as the Python VirtioNetHdr holds them. */
typedef struct {
    long flags, gso_type, hdr_len, gso_size, csum_start, csum_offset;
} VnetHdr;

/* What a split needs, validated with the GIL held (mirrors packet.py's _segment_plan/_split_tcp checks). */
typedef struct {
    int version, is_tcp;
    Py_ssize_t ihl, l4_len, headers_len, size, count;
} SplitPlan;

/* 0 and the plan when the super-packet is one packet.py splits; -1 where it raises (the wrapper falls back). */
static int plan_split(long gso, long gso_size, const unsigned char *p, Py_ssize_t n, SplitPlan *plan) {
    int expected_version = 0;
    int protocol;
    if (gso == VNET_GSO_TCPV4 || gso == VNET_GSO_TCPV6) {
        expected_version = gso == VNET_GSO_TCPV4 ? 4 : 6;
        protocol = PROTO_TCP;
    } else if (gso == VNET_GSO_UDP_L4) {
        protocol = PROTO_UDP;
    } else {
        return -1;
    }
    if (n < 1) {
        return -1;
    }
    int version = p[0] >> 4;
    if (expected_version && version != expected_version) {
        return -1;
    }
    Py_ssize_t ihl;
    if (version == 4) {
        if (n < IPV4_HEADER_LEN) {
            return -1;
        }
        ihl = (Py_ssize_t)(p[0] & 0x0F) * 4;
        if (ihl < IPV4_HEADER_LEN || ihl > n || p[9] != protocol) {
            return -1;
        }
    } else if (version == 6) {
        if (n < IPV6_HEADER_LEN || p[6] != protocol) {
            return -1;
        }
        ihl = IPV6_HEADER_LEN;
    } else {
        return -1;
    }
    Py_ssize_t l4_len = UDP_HEADER_LEN;
    if (protocol == PROTO_TCP) {
        if (n < ihl + TCP_MIN_HEADER_LEN) {
            return -1;
        }
        l4_len = (Py_ssize_t)(p[ihl + 12] >> 4) * 4;
        if (l4_len < TCP_MIN_HEADER_LEN) {
            return -1;
        }
    }
    Py_ssize_t headers_len = ihl + l4_len;
    if (headers_len > n || gso_size <= 0) {
        return -1;
    }
    Py_ssize_t payload = n - headers_len;
    if (headers_len + (gso_size < payload ? gso_size : payload) > MAX_IP_PACKET) {
        return -1;
    }
    plan->version = version;
    plan->is_tcp = protocol == PROTO_TCP;
    plan->ihl = ihl;
    plan->l4_len = l4_len;
    plan->headers_len = headers_len;
    plan->size = gso_size;
    plan->count = payload ? (payload + gso_size - 1) / gso_size : 1;
    return 0;
}

/* Sets the length fields of the IP header at ``header`` (``ihl`` bytes, then ``l4_total`` bytes of TCP/UDP; IPv4:
   total length and header checksum, so any other field must be set before) and returns its pseudo-header sum
   without the L4 length: addresses and ``protocol``. Split and coalesce share it. */
static uint64_t finish_ip_header(unsigned char *header, Py_ssize_t ihl, Py_ssize_t l4_total, unsigned protocol) {
    if (header[0] >> 4 == 4) {
        store16(header + 2, (unsigned)(ihl + l4_total));
        store16(header + 10, 0);
        store16(header + 10, negated_fold(header_sum(header, ihl)));
        return header_sum(header + 12, 8) + protocol;
    }
    store16(header + 4, (unsigned)l4_total);
    return header_sum(header + 8, 32) + protocol;
}

/* Writes segment ``index`` of the super-packet ``p`` to ``out``. Runs without the GIL. */
static void write_segment(const SplitPlan *plan, const unsigned char *p, Py_ssize_t n, Py_ssize_t index,
                          unsigned char *out) {
    Py_ssize_t ihl = plan->ihl;
    Py_ssize_t headers_len = plan->headers_len;
    Py_ssize_t start = headers_len + index * plan->size;
    Py_ssize_t seg_len = n - start < plan->size ? n - start : plan->size;
    Py_ssize_t l4_total = plan->l4_len + seg_len;
    memcpy(out, p, (size_t)headers_len);
    memcpy(out + headers_len, p + start, (size_t)seg_len);
    if (plan->version == 4) {
        store16(out + 4, (load16(p + 4) + (unsigned)index) & 0xFFFF);
    }
    uint64_t pseudo = finish_ip_header(out, ihl, l4_total, plan->is_tcp ? PROTO_TCP : PROTO_UDP);
    unsigned char *l4 = out + ihl;
    Py_ssize_t csum_at;
    if (plan->is_tcp) {
        unsigned flags = p[ihl + 13];
        if (index != plan->count - 1) {
            flags &= ~(unsigned)(TCP_FIN | TCP_PSH);
        }
        if (index) {
            flags &= ~(unsigned)TCP_CWR;
        }
        store32(l4 + 4, load32(p + ihl + 4) + (uint32_t)((uint64_t)index * (uint64_t)plan->size));
        l4[13] = (unsigned char)flags;
        csum_at = 16;
    } else {
        store16(l4 + 4, (unsigned)l4_total);
        csum_at = 6;
    }
    store16(l4 + csum_at, 0);
    uint64_t sum = pseudo + (uint64_t)l4_total + header_sum(l4, plan->l4_len) +
                   big_endian_value_mod_fold(sum_host_words(p + start, seg_len));
    unsigned checksum = negated_fold(sum);
    if (!plan->is_tcp && checksum == 0) {
        checksum = 0xFFFF;  /* UDP: 0 means "no checksum" */
    }
    store16(l4 + csum_at, checksum);
}

/* The segments of a valid super-packet as a new list, or NULL with an exception set. */
static PyObject *split_segments(const SplitPlan *plan, const unsigned char *p, Py_ssize_t n) {
    PyObject *result = PyList_New(plan->count);
    if (result == NULL) {
        return NULL;
    }
    unsigned char **outputs = PyMem_Calloc((size_t)plan->count, sizeof(unsigned char *));
    if (outputs == NULL) {
        Py_DECREF(result);
        return PyErr_NoMemory();
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < plan->count; i++) {
        Py_ssize_t start = plan->headers_len + i * plan->size;
        Py_ssize_t seg_len = n - start < plan->size ? n - start : plan->size;
        PyObject *segment = PyBytes_FromStringAndSize(NULL, plan->headers_len + seg_len);
        if (segment == NULL) {
            PyMem_Free(outputs);
            Py_DECREF(result);
            return NULL;
        }
        outputs[i] = (unsigned char *)PyBytes_AS_STRING(segment);
        PyList_SET_ITEM(result, i, segment);
        total += plan->headers_len + seg_len;
    }
    if (total >= SPLIT_GIL_RELEASE_SIZE) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < plan->count; i++) {
            write_segment(plan, p, n, i, outputs[i]);
        }
        Py_END_ALLOW_THREADS
    } else {
        for (Py_ssize_t i = 0; i < plan->count; i++) {
            write_segment(plan, p, n, i, outputs[i]);
        }
    }
    PyMem_Free(outputs);
    return result;
}

/* packet.py's _complete_checksum: a copy of the packet with the pending NEEDS_CSUM checksum filled in. */
static PyObject *complete_checksum(const VnetHdr *hdr, const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t start = hdr->csum_start;
    Py_ssize_t field = start + hdr->csum_offset;
    if (field + 2 > n || start > n) {
        Py_RETURN_NONE;
    }
    PyObject *packet = PyBytes_FromStringAndSize((const char *)p, n);
    if (packet == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packet);
    /* The field holds the pseudo-header partial sum: summing over it includes it. */
    uint64_t host_sum = sum_host_words(out + start, n - start);
    unsigned checksum;
    if (host_sum == 0) {
        checksum = 0xFFFF;  /* ~0: every summed byte is zero */
    } else {
        unsigned folded = (unsigned)big_endian_value_mod_fold(host_sum);
        checksum = 0xFFFF - (folded ? folded : 0xFFFF);
    }
    if (checksum == 0 && hdr->csum_offset == 6) {
        checksum = 0xFFFF;  /* UDP: 0 means "no checksum" */
    }
    store16(out + field, checksum);
    PyObject *result = PyList_New(1);
    if (result == NULL) {
        Py_DECREF(packet);
        return NULL;
    }
    PyList_SET_ITEM(result, 0, packet);
    return result;
}

/* split_gso on an acquired buffer: a list, None (the reference raises or the input is unusual), or NULL + error. */
static PyObject *split_buffer(const VnetHdr *hdr, const unsigned char *p, Py_ssize_t n) {
    long gso = hdr->gso_type & ~(long)VNET_GSO_ECN;
    if (gso == VNET_GSO_NONE) {
        if (!(hdr->flags & VNET_F_NEEDS_CSUM)) {
            PyObject *packet = PyBytes_FromStringAndSize((const char *)p, n);
            if (packet == NULL) {
                return NULL;
            }
            PyObject *result = PyList_New(1);
            if (result == NULL) {
                Py_DECREF(packet);
                return NULL;
            }
            PyList_SET_ITEM(result, 0, packet);
            return result;
        }
        return complete_checksum(hdr, p, n);
    }
    SplitPlan plan;
    if (plan_split(gso, hdr->gso_size, p, n, &plan) < 0) {
        Py_RETURN_NONE;
    }
    return split_segments(&plan, p, n);
}

/* A header field for the C path: 0..0xFFFF (what a decoded virtio_net_hdr holds), else the wrapper falls back. */
static int vnet_field(PyObject *value, long *out) {
    if (!PyLong_Check(value)) {
        return -1;
    }
    long field = PyLong_AsLong(value);
    if (field == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (field < 0 || field > 0xFFFF) {
        return -1;
    }
    *out = field;
    return 0;
}

PyDoc_STRVAR(split_gso_doc,
             "split_gso(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, packet, /) -> list[bytes] | None\n\n"
             "dataplane.packet.split_gso with the virtio_net_hdr fields passed one by one; None where the reference\n"
             "raises (or for field values outside 0..0xFFFF): call the reference then.");

static PyObject *split_gso(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "split_gso takes 7 arguments");
        return NULL;
    }
    VnetHdr hdr;
    long *fields[6] = {&hdr.flags, &hdr.gso_type, &hdr.hdr_len, &hdr.gso_size, &hdr.csum_start, &hdr.csum_offset};
    for (int i = 0; i < 6; i++) {
        if (vnet_field(args[i], fields[i]) < 0) {
            Py_RETURN_NONE;
        }
    }
    Py_buffer packet;
    if (PyObject_GetBuffer(args[6], &packet, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *result = split_buffer(&hdr, packet.buf, packet.len);
    PyBuffer_Release(&packet);
    return result;
}

PyDoc_STRVAR(split_gso_frame_doc,
             "split_gso_frame(frame, /) -> list[bytes] | None\n\n"
             "split_gso of a whole TUN read (little-endian virtio_net_hdr, then the packet); None where the\n"
             "reference (VirtioNetHdr.decode + split_gso) raises: call it then.");

static PyObject *split_gso_frame(PyObject *module, PyObject *frame_object) {
    (void)module;
    Py_buffer frame;
    if (PyObject_GetBuffer(frame_object, &frame, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *result;
    if (frame.len < VNET_HDR_LEN) {
        result = Py_NewRef(Py_None);
    } else {
        const unsigned char *f = frame.buf;
        VnetHdr hdr = {f[0], f[1], f[2] | (f[3] << 8), f[4] | (f[5] << 8), f[6] | (f[7] << 8), f[8] | (f[9] << 8)};
        result = split_buffer(&hdr, f + VNET_HDR_LEN, frame.len - VNET_HDR_LEN);
    }
    PyBuffer_Release(&frame);
    return result;
}

/* --- flow_hash --------------------------------------------------------------------------------------------------- */

static inline int is_ported(unsigned protocol) { return protocol == PROTO_TCP || protocol == PROTO_UDP; }

PyDoc_STRVAR(flow_hash_doc,
             "flow_hash(packet, /) -> int\n\n"
             "dataplane.packet.flow_hash: Python's hash() of the same key bytes (equal within one process).");

static PyObject *flow_hash(PyObject *module, PyObject *packet_object) {
    (void)module;
    Py_buffer packet;
    if (PyObject_GetBuffer(packet_object, &packet, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *p = packet.buf;
    Py_ssize_t n = packet.len;
    unsigned char key[1 + 36];
    Py_ssize_t key_len = 0;
    if (n >= IPV4_HEADER_LEN) {
        unsigned version = p[0] >> 4;
        if (version == 4) {
            Py_ssize_t ihl = (Py_ssize_t)(p[0] & 0x0F) * 4;
            int unfragmented = !((p[6] & 0x3F) || p[7]);
            key[0] = p[9];
            memcpy(key + 1, p + 12, 8);
            key_len = 9;
            if (is_ported(p[9]) && unfragmented && n >= ihl + 4) {
                /* 0x45: the ports directly follow the addresses (ihl == 20), the same bytes packet.py takes. */
                memcpy(key + 9, p + ihl, 4);
                key_len = 13;
            }
        } else if (version == 6 && n >= IPV6_HEADER_LEN) {
            key[0] = p[6];
            key_len = is_ported(p[6]) && n >= 44 ? 37 : 33;
            memcpy(key + 1, p + 8, (size_t)key_len - 1);
        }
    }
    PyBuffer_Release(&packet);
    return PyLong_FromSsize_t(key_len ? _Py_HashBytes(key, key_len) : 0);
}

/* --- plain_flow_end ---------------------------------------------------------------------------------------------- */

PyDoc_STRVAR(plain_flow_end_doc,
             "plain_flow_end(packets, start, key, protocol, least, /) -> int\n\n"
             "The end of the run of packets from packets[start] that are plain IPv4 packets of one flow: bytes objects "
             "starting 0x45, not fragments, of that protocol, bytes 12-24 equal to key, total length within "
             "[least, len]. packets must be a list; start >= 0.");

static PyObject *plain_flow_end(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "plain_flow_end(packets, start, key, protocol, least) takes 5 arguments");
        return NULL;
    }
    PyObject *packets = args[0];
    PyObject *key_object = args[2];
    if (!PyList_Check(packets) || !PyBytes_Check(key_object)) {
        PyErr_SetString(PyExc_TypeError, "plain_flow_end: packets must be a list and key bytes");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long protocol = PyLong_AsLong(args[3]);
    if (protocol == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long least = PyLong_AsLong(args[4]);
    if (least == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "plain_flow_end: start must not be negative");
        return NULL;
    }
    Py_ssize_t end = start;
    if (PyBytes_GET_SIZE(key_object) != 12) {
        return PyLong_FromSsize_t(end);
    }
    const char *key = PyBytes_AS_STRING(key_object);
    Py_ssize_t count = PyList_GET_SIZE(packets);
    for (; end < count; end++) {
        PyObject *item = PyList_GET_ITEM(packets, end);
        if (!PyBytes_Check(item)) {
            break;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(item);
        Py_ssize_t n = PyBytes_GET_SIZE(item);
        if (n < 24 || memcmp(p + 12, key, 12) != 0) {
            break;
        }
        if (p[0] != 0x45 || (long)p[9] != protocol || (p[6] & 0x3F) || p[7]) {
            break;
        }
        long total = ((long)p[2] << 8) | p[3];
        if (total < least || total > n) {
            break;
        }
    }
    return PyLong_FromSsize_t(end);
}

/* --- coalesce ---------------------------------------------------------------------------------------------------- */
/*
 * The twin of dataplane/packet.py's coalesce (GRO in reverse for TUN writes). Packets are classified and grouped with
 * the GIL held (header compares only), the output frames allocated, then headers, checksums and payload copies are
 * written without the GIL. The merge keys are compared field by field; they are the same bytes packet.py puts in its
 * dict keys (IPv4/TCP: its fast-path tuple, which includes the urgent pointer; IPv6/TCP: without it).
 */

#define MAX_SEGMENTS 64
#define TCP_ACK 0x10
#define IPV4_DF 0x40 /* in the high byte of the flags/fragment word */
#define COALESCE_GIL_RELEASE_SIZE 4096

enum { KIND_PLAIN = 0, KIND_V4_TCP, KIND_V4_UDP, KIND_V6_UDP, KIND_V6_TCP };

typedef struct {
    const unsigned char *data;
    Py_ssize_t len;
} Packet;

typedef struct {
    int kind;
    Py_ssize_t first, last; /* packet indices; members are chained through next_member */
    Py_ssize_t members, gso_size, total;
    uint32_t next_seq;
    long next_ip_id; /* -1: ids are not checked (DF) */
    int closed;
} Group;

typedef struct {
    int kind;
    Py_ssize_t ihl, l4_len, payload_len;
    uint32_t next_seq;
    int may_extend;
    long ip_id;
} Classified;

/* packet.py's fast path and _coalesce_key: which kind of mergeable packet this is (KIND_PLAIN: never merged). */
static Classified classify(const unsigned char *p, Py_ssize_t n, int tcp, int udp) {
    Classified c = {KIND_PLAIN, 0, 0, 0, 0, 0, -1};
    if (tcp && n > 40 && p[0] == 0x45 && p[9] == PROTO_TCP) {
        Py_ssize_t thlen = (Py_ssize_t)(p[32] >> 4) * 4;
        Py_ssize_t payload_len = n - 20 - thlen;
        unsigned frag = load16(p + 6);
        unsigned flags = p[33];
        if ((Py_ssize_t)load16(p + 2) != n || (frag & 0xBFFF) || (flags & ~(unsigned)TCP_PSH) != TCP_ACK ||
            thlen < TCP_MIN_HEADER_LEN || payload_len <= 0) {
            return c;
        }
        c.kind = KIND_V4_TCP;
        c.ihl = 20;
        c.l4_len = thlen;
        c.payload_len = payload_len;
        c.next_seq = load32(p + 24) + (uint32_t)payload_len;
        c.may_extend = !(flags & TCP_PSH);
        c.ip_id = (frag & 0x4000) ? -1 : (long)load16(p + 4);
        return c;
    }
    if (n < 1) {
        return c;
    }
    int version = p[0] >> 4;
    Py_ssize_t ihl;
    unsigned protocol;
    long ip_id = -1;
    if (version == 4) {
        if (n < IPV4_HEADER_LEN || p[0] != 0x45) {
            return c;
        }
        if ((Py_ssize_t)load16(p + 2) != n || (p[6] & 0xBF) || p[7]) {
            return c;
        }
        protocol = p[9];
        ihl = IPV4_HEADER_LEN;
        if (!(p[6] & IPV4_DF)) {
            ip_id = (long)load16(p + 4);
        }
    } else if (version == 6) {
        if (n < IPV6_HEADER_LEN || (Py_ssize_t)load16(p + 4) != n - IPV6_HEADER_LEN) {
            return c;
        }
        protocol = p[6];
        ihl = IPV6_HEADER_LEN;
    } else {
        return c;
    }
    if (protocol == PROTO_TCP && tcp) {
        if (n < ihl + TCP_MIN_HEADER_LEN) {
            return c;
        }
        Py_ssize_t thlen = (Py_ssize_t)(p[ihl + 12] >> 4) * 4;
        unsigned flags = p[ihl + 13];
        if (thlen < TCP_MIN_HEADER_LEN || ihl + thlen > n || (flags & ~(unsigned)TCP_PSH) != TCP_ACK) {
            return c;
        }
        Py_ssize_t payload_len = n - ihl - thlen;
        if (payload_len == 0) {
            return c;
        }
        /* IPv4 TCP always takes the fast path above (tcp set, 0x45, n > 40): only IPv6 gets here. */
        c.kind = version == 6 ? KIND_V6_TCP : KIND_PLAIN;
        c.ihl = ihl;
        c.l4_len = thlen;
        c.payload_len = payload_len;
        c.next_seq = load32(p + ihl + 4) + (uint32_t)payload_len;
        c.may_extend = !(flags & TCP_PSH);
        c.ip_id = ip_id;
        return c;
    }
    if (protocol == PROTO_UDP && udp) {
        if (n < ihl + UDP_HEADER_LEN || (Py_ssize_t)load16(p + ihl + 4) != n - ihl) {
            return c;
        }
        Py_ssize_t payload_len = n - ihl - UDP_HEADER_LEN;
        if (payload_len == 0) {
            return c;
        }
        c.kind = version == 4 ? KIND_V4_UDP : KIND_V6_UDP;
        c.ihl = ihl;
        c.l4_len = UDP_HEADER_LEN;
        c.payload_len = payload_len;
        c.may_extend = 1;
        c.ip_id = ip_id;
    }
    return c;
}

static inline int same(const unsigned char *a, const unsigned char *b, Py_ssize_t from, Py_ssize_t to) {
    return memcmp(a + from, b + from, (size_t)(to - from)) == 0;
}

/* Whether two classified packets of one kind have equal merge keys (all offsets were bounds-checked by classify). */
static int same_flow(int kind, const unsigned char *a, const unsigned char *b, Py_ssize_t l4_len) {
    switch (kind) {
    case KIND_V4_TCP: /* tos, flags/fragment, ttl, addresses+ports, ack+data offset, window, urgent, options */
        return a[1] == b[1] && same(a, b, 6, 9) && same(a, b, 12, 24) && same(a, b, 28, 33) && same(a, b, 34, 36) &&
               same(a, b, 38, 40) && same(a, b, 40, 20 + l4_len);
    case KIND_V4_UDP: /* tos, DF, ttl, protocol, addresses, ports */
        return a[1] == b[1] && a[6] == b[6] && same(a, b, 8, 10) && same(a, b, 12, 24);
    case KIND_V6_UDP: /* traffic class, flow label, next header, hop limit, addresses, ports */
        return same(a, b, 0, 4) && same(a, b, 6, 44);
    case KIND_V6_TCP: /* ... ports, ack+data offset, window, options */
        return same(a, b, 0, 4) && same(a, b, 6, 44) && same(a, b, 48, 53) && same(a, b, 54, 56) &&
               same(a, b, 60, 40 + l4_len);
    default:
        return 0;
    }
}

/* packet.py's _try_append. */
static int try_append(Group *group, const Classified *c, Py_ssize_t index, Py_ssize_t *next_member) {
    if (group->closed || group->members >= MAX_SEGMENTS || c->payload_len > group->gso_size) {
        return 0;
    }
    if (group->total + c->payload_len > MAX_IP_PACKET || c->ip_id != group->next_ip_id) {
        return 0;
    }
    if (group->kind == KIND_V4_TCP || group->kind == KIND_V6_TCP) {
        if (c->next_seq - (uint32_t)c->payload_len != group->next_seq) {
            return 0;
        }
        group->next_seq = c->next_seq;
    }
    if (c->ip_id >= 0) {
        group->next_ip_id = (c->ip_id + 1) & 0xFFFF;
    }
    next_member[group->last] = index;
    group->last = index;
    group->members++;
    group->total += c->payload_len;
    /* A short segment (or PSH) must be the last one: the kernel cuts every gso_size bytes. */
    if (c->payload_len < group->gso_size || !c->may_extend) {
        group->closed = 1;
    }
    return 1;
}

/* packet.py's _emit_group (and the plain frame of a lone packet): writes 10 + total bytes. Runs without the GIL. */
static void emit_group(const Group *group, const Packet *packets, const Py_ssize_t *next_member,
                       const Classified *first_class, unsigned char *out) {
    const Packet *first = &packets[group->first];
    memset(out, 0, VNET_HDR_LEN);
    if (group->members == 1) {
        memcpy(out + VNET_HDR_LEN, first->data, (size_t)first->len);
        return;
    }
    Py_ssize_t ihl = first_class->ihl;
    Py_ssize_t headers_len = ihl + first_class->l4_len;
    unsigned char *header = out + VNET_HDR_LEN;
    memcpy(header, first->data, (size_t)headers_len);
    Py_ssize_t total = group->total;
    Py_ssize_t l4_total = total - ihl;
    int version = first->data[0] >> 4;
    int is_tcp = group->kind == KIND_V4_TCP || group->kind == KIND_V6_TCP;
    uint64_t pseudo = finish_ip_header(header, ihl, l4_total, is_tcp ? PROTO_TCP : PROTO_UDP);
    unsigned gso_type, csum_offset;
    if (is_tcp) {
        /* PSH of the last segment carries over (the kernel keeps it on the last segment only). */
        header[ihl + 13] |= packets[group->last].data[ihl + 13] & TCP_PSH;
        gso_type = version == 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
        csum_offset = 16;
    } else {
        store16(header + ihl + 4, (unsigned)l4_total);
        gso_type = VNET_GSO_UDP_L4;
        csum_offset = 6;
    }
    unsigned partial = (unsigned)((pseudo + (uint64_t)l4_total) % FOLD);
    store16(header + ihl + csum_offset, partial ? partial : 0xFFFF);
    unsigned vnet[5] = {(unsigned)headers_len, (unsigned)group->gso_size, (unsigned)ihl, csum_offset, 0};
    out[0] = VNET_F_NEEDS_CSUM;
    out[1] = (unsigned char)gso_type;
    for (int i = 0; i < 4; i++) {
        out[2 + 2 * i] = (unsigned char)vnet[i];
        out[3 + 2 * i] = (unsigned char)(vnet[i] >> 8);
    }
    unsigned char *cursor = header + headers_len;
    for (Py_ssize_t i = group->first; i >= 0; i = next_member[i]) {
        Py_ssize_t size = packets[i].len - headers_len;
        memcpy(cursor, packets[i].data + headers_len, (size_t)size);
        cursor += size;
    }
}

PyDoc_STRVAR(coalesce_doc,
             "coalesce(packets, tcp, udp, /) -> list[bytes] | None\n\n"
             "dataplane.packet.coalesce(packets, tcp=tcp, udp=udp); None when an item is not exactly bytes\n"
             "(the reference's behaviour on other buffers is its own): call the reference then.");

static PyObject *coalesce(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "coalesce takes 3 arguments");
        return NULL;
    }
    int tcp = PyObject_IsTrue(args[1]);
    int udp = PyObject_IsTrue(args[2]);
    if (tcp < 0 || udp < 0) {
        return NULL;
    }
    /* A tuple holds a reference to every packet while the GIL is released (a list could be changed meanwhile). */
    PyObject *items = PySequence_Tuple(args[0]);
    if (items == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(items, i))) {
            Py_DECREF(items);
            Py_RETURN_NONE;
        }
    }
    size_t slots = count ? (size_t)count : 1;
    Packet *packets = PyMem_Calloc(slots, sizeof(Packet));
    Classified *classes = PyMem_Calloc(slots, sizeof(Classified));
    Group *groups = PyMem_Calloc(slots, sizeof(Group));
    Py_ssize_t *next_member = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    unsigned char **outputs = PyMem_Calloc(slots, sizeof(unsigned char *));
    PyObject *result = NULL;
    if (packets == NULL || classes == NULL || groups == NULL || next_member == NULL || outputs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t group_count = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        packets[i].data = (const unsigned char *)PyBytes_AS_STRING(item);
        packets[i].len = PyBytes_GET_SIZE(item);
        next_member[i] = -1;
        Classified *c = &classes[i];
        *c = classify(packets[i].data, packets[i].len, tcp, udp);
        if (c->kind != KIND_PLAIN) {
            /* The newest group of this flow (packet.py's open_groups[key]) takes the packet if it can. */
            Py_ssize_t g = group_count - 1;
            for (; g >= 0; g--) {
                if (groups[g].kind == c->kind &&
                    same_flow(c->kind, packets[i].data, packets[groups[g].first].data, c->l4_len)) {
                    break;
                }
            }
            if (g >= 0 && try_append(&groups[g], c, i, next_member)) {
                continue;
            }
        }
        Group *group = &groups[group_count++];
        group->kind = c->kind;
        group->first = group->last = i;
        group->members = 1;
        group->gso_size = c->payload_len;
        group->total = packets[i].len;
        group->next_seq = c->next_seq;
        group->next_ip_id = c->ip_id >= 0 ? (c->ip_id + 1) & 0xFFFF : -1;
        group->closed = !c->may_extend;
    }
    result = PyList_New(group_count);
    if (result == NULL) {
        goto done;
    }
    Py_ssize_t output_bytes = 0;
    for (Py_ssize_t g = 0; g < group_count; g++) {
        PyObject *frame = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN + groups[g].total);
        if (frame == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        outputs[g] = (unsigned char *)PyBytes_AS_STRING(frame);
        PyList_SET_ITEM(result, g, frame);
        output_bytes += VNET_HDR_LEN + groups[g].total;
    }
    if (output_bytes >= COALESCE_GIL_RELEASE_SIZE) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t g = 0; g < group_count; g++) {
            emit_group(&groups[g], packets, next_member, &classes[groups[g].first], outputs[g]);
        }
        Py_END_ALLOW_THREADS
    } else {
        for (Py_ssize_t g = 0; g < group_count; g++) {
            emit_group(&groups[g], packets, next_member, &classes[groups[g].first], outputs[g]);
        }
    }
done:
    PyMem_Free(packets);
    PyMem_Free(classes);
    PyMem_Free(groups);
    PyMem_Free(next_member);
    PyMem_Free(outputs);
    Py_DECREF(items);
    return result;
}

/* --- sealed_size, gso_run_ends, destination_runs: the per-packet loops of the send path -------------------------- */

/* len(item): the bytes fast path, else the object's length (-1 with an exception set). */
static inline Py_ssize_t item_length(PyObject *item) {
    return PyBytes_Check(item) ? PyBytes_GET_SIZE(item) : PyObject_Length(item);
}

PyDoc_STRVAR(sealed_size_doc,
             "sealed_size(packets, mtu, /) -> int\n\n"
             "Bytes of the transport messages seal_batch makes of packets (header, padding to 16 but never past mtu, "
             "tag), without sealing them. mtu None: no limit.");

static PyObject *sealed_size(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sealed_size(packets, mtu) takes 2 arguments");
        return NULL;
    }
    int limited = args[1] != Py_None;
    long long mtu = 0;
    if (limited) {
        mtu = PyLong_AsLongLong(args[1]);
        if (mtu == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *items = PySequence_Fast(args[0], "sealed_size: packets must be a sequence");
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    PyObject **objects = PySequence_Fast_ITEMS(items);
    long long total = (long long)(HEADER_SIZE + TAG_SIZE) * count;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t size = item_length(objects[i]);
        if (size < 0) {
            Py_DECREF(items);
            return NULL;
        }
        long long padded = size + (PADDING_MULTIPLE - size % PADDING_MULTIPLE) % PADDING_MULTIPLE;
        if (limited && padded > mtu) {
            padded = mtu > size ? mtu : size;
        }
        total += padded;
    }
    Py_DECREF(items);
    return PyLong_FromLongLong(total);
}

PyDoc_STRVAR(gso_run_ends_doc,
             "gso_run_ends(payloads, max_segments, max_bytes, /) -> list[int]\n\n"
             "payloads cut into runs one UDP GSO send can carry, as the index after each run's last payload: equal "
             "sizes except that the last may be shorter, non-empty, at most max_segments payloads and max_bytes bytes "
             "(a lone payload is a run of its own whatever its size).");

static PyObject *gso_run_ends(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "gso_run_ends(payloads, max_segments, max_bytes) takes 3 arguments");
        return NULL;
    }
    Py_ssize_t max_segments = PyLong_AsSsize_t(args[1]);
    if (max_segments == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[2]);
    if (max_bytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *items = PySequence_Fast(args[0], "gso_run_ends: payloads must be a sequence");
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    PyObject **objects = PySequence_Fast_ITEMS(items);
    PyObject *ends = PyList_New(0);
    Py_ssize_t i = 0;
    while (ends != NULL && i < count) {
        Py_ssize_t size = item_length(objects[i]);
        if (size < 0) {
            Py_CLEAR(ends);
            break;
        }
        Py_ssize_t j = i + 1;
        if (size) {
            Py_ssize_t total = size;
            while (j < count && j - i < max_segments) {
                Py_ssize_t length = item_length(objects[j]);
                if (length < 0) {
                    Py_CLEAR(ends);
                    break;
                }
                if (length > size || length == 0 || max_bytes < length || total > max_bytes - length) {
                    break;
                }
                total += length;
                j++;
                if (length < size) {
                    break; /* only the last segment may be short */
                }
            }
            if (ends == NULL) {
                break;
            }
        }
        PyObject *end = PyLong_FromSsize_t(j);
        if (end == NULL || PyList_Append(ends, end) < 0) {
            Py_XDECREF(end);
            Py_CLEAR(ends);
            break;
        }
        Py_DECREF(end);
        i = j;
    }
    Py_DECREF(items);
    return ends;
}

/* An IP packet's destination address: its offset and size, or size 0 when the packet is not IPv4/IPv6 or too short. */
static inline void destination_of(const unsigned char *p, Py_ssize_t n, Py_ssize_t *offset, Py_ssize_t *size) {
    int version = n ? p[0] >> 4 : 0;
    if (version == 4 && n >= 20) {
        *offset = 16;
        *size = 4;
    } else if (version == 6 && n >= 40) {
        *offset = 24;
        *size = 16;
    } else {
        *offset = 0;
        *size = 0;
    }
}

/* Appends (end, address) to runs, address None when size is 0. 0 on success. */
static int append_run(PyObject *runs, Py_ssize_t end, const unsigned char *address, Py_ssize_t size) {
    PyObject *run;
    if (size) {
        run = Py_BuildValue("(ny#)", end, (const char *)address, size);
    } else {
        run = Py_BuildValue("(nO)", end, Py_None);
    }
    if (run == NULL) {
        return -1;
    }
    int status = PyList_Append(runs, run);
    Py_DECREF(run);
    return status;
}

PyDoc_STRVAR(destination_runs_doc,
             "destination_runs(packets, /) -> list[tuple[int, bytes | None]]\n\n"
             "packets cut into runs of one destination address (4 bytes for IPv4, 16 for IPv6), as (index after the "
             "run, address); address None for a run of packets too short for their IP version or of no version 4 or 6.");

static PyObject *destination_runs(PyObject *module, PyObject *packets_object) {
    (void)module;
    PyObject *items = PySequence_Fast(packets_object, "destination_runs: packets must be a sequence");
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    PyObject **objects = PySequence_Fast_ITEMS(items);
    PyObject *runs = PyList_New(0);
    unsigned char current[16];
    Py_ssize_t current_size = -1; /* -1: no run open yet; 0: a run of invalid packets */
    for (Py_ssize_t i = 0; runs != NULL && i < count; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(objects[i], &view, PyBUF_SIMPLE) < 0) {
            Py_CLEAR(runs);
            break;
        }
        const unsigned char *p = view.buf;
        Py_ssize_t offset, size;
        destination_of(p, view.len, &offset, &size);
        int same = current_size == size && memcmp(current, p + offset, (size_t)size) == 0;
        if (!same) {
            if (current_size >= 0 && append_run(runs, i, current, current_size) < 0) {
                Py_CLEAR(runs);
            }
            memcpy(current, p + offset, (size_t)size);
            current_size = size;
        }
        PyBuffer_Release(&view);
    }
    if (runs != NULL && current_size >= 0 && append_run(runs, count, current, current_size) < 0) {
        Py_CLEAR(runs);
    }
    Py_DECREF(items);
    return runs;
}

/* --- accept_transport_run: the replay check and inner header checks of a run of opened messages ------------------ */

#define REPLAY_BLOCK_BIT_LOG 6
#define REPLAY_RING_BLOCKS 128
#define REPLAY_BLOCK_MASK (REPLAY_RING_BLOCKS - 1)
#define REPLAY_WINDOW_SIZE ((uint64_t)(REPLAY_RING_BLOCKS - 1) << REPLAY_BLOCK_BIT_LOG)

/* dataplane/wireguard/replay.py's replay_accept: 1 when counter is new (marked seen, *last moved), 0 if rejected. */
static int replay_accept(uint64_t *ring, uint64_t *last, uint64_t limit, uint64_t counter) {
    if (counter >= limit) {
        return 0;
    }
    if (counter > *last) {
        uint64_t block = counter >> REPLAY_BLOCK_BIT_LOG;
        uint64_t current = *last >> REPLAY_BLOCK_BIT_LOG;
        if (block != current) {
            uint64_t diff = block - current;
            if (diff > REPLAY_RING_BLOCKS) {
                diff = REPLAY_RING_BLOCKS;
            }
            for (uint64_t i = current + 1; i <= current + diff; i++) {
                ring[i & REPLAY_BLOCK_MASK] = 0;
            }
        }
        ring[block & REPLAY_BLOCK_MASK] |= (uint64_t)1 << (counter & 63);
        *last = counter;
        return 1;
    }
    if (*last - counter > REPLAY_WINDOW_SIZE) {
        return 0;
    }
    uint64_t *word = &ring[(counter >> REPLAY_BLOCK_BIT_LOG) & REPLAY_BLOCK_MASK];
    uint64_t bit = (uint64_t)1 << (counter & 63);
    if (*word & bit) {
        return 0;
    }
    *word |= bit;
    return 1;
}

static inline uint64_t load_le64(const unsigned char *in) {
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--) {
        value = (value << 8) | in[i];
    }
    return value;
}

PyDoc_STRVAR(accept_transport_run_doc,
             "accept_transport_run(messages, plaintexts, ring, last, limit, /) -> tuple\n\n"
             "What a run of transport messages delivers once open_batch gave their plaintexts: the replay check (ring, "
             "an array('Q') of 128 blocks updated in place, last and limit of a ReplayFilter) and the inner packet's "
             "header checks. Returns (packets, source runs, new last, decryption failed, replayed, rejected bytes, "
             "invalid inner packets, keepalives); see dataplane/native_fallback.py.");

static PyObject *accept_transport_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "accept_transport_run(messages, plaintexts, ring, last, limit) takes 5 arguments");
        return NULL;
    }
    uint64_t last = PyLong_AsUnsignedLongLong(args[3]);
    if (last == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    uint64_t limit = PyLong_AsUnsignedLongLong(args[4]);
    if (limit == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer ring;
    if (PyObject_GetBuffer(args[2], &ring, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        /* Whatever the object's own complaint (e.g. BufferError from a memoryview), the twin's: not a ring. */
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "accept_transport_run: ring must be an array of 128 64-bit blocks");
        return NULL;
    }
    if (ring.itemsize != 8 || ring.len != REPLAY_RING_BLOCKS * 8 || ring.format == NULL ||
        (strcmp(ring.format, "Q") != 0 && strcmp(ring.format, "L") != 0)) {
        PyBuffer_Release(&ring);
        PyErr_SetString(PyExc_TypeError, "accept_transport_run: ring must be an array of 128 64-bit blocks");
        return NULL;
    }
    PyObject *messages = PySequence_Fast(args[0], "accept_transport_run: messages must be a sequence");
    PyObject *plaintexts = messages ? PySequence_Fast(args[1], "accept_transport_run: plaintexts must be a sequence")
                                    : NULL;
    PyObject *packets = NULL, *sources = NULL, *result = NULL;
    if (plaintexts == NULL) {
        goto done;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(messages);
    if (PySequence_Fast_GET_SIZE(plaintexts) != count) {
        PyErr_SetString(PyExc_ValueError, "accept_transport_run: messages and plaintexts differ in length");
        goto done;
    }
    packets = PyList_New(0);
    sources = PyList_New(0);
    if (packets == NULL || sources == NULL) {
        goto done;
    }
    uint64_t *blocks = ring.buf;
    long long failed = 0, replayed = 0, rejected_bytes = 0, invalid = 0, keepalives = 0;
    unsigned char source[16];
    Py_ssize_t source_size = 0; /* of the open source run; 0: none yet */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *message = PySequence_Fast_GET_ITEM(messages, i);
        PyObject *plaintext = PySequence_Fast_GET_ITEM(plaintexts, i);
        Py_ssize_t message_size;
        uint64_t counter = 0;
        if (PyBytes_Check(message)) {
            message_size = PyBytes_GET_SIZE(message);
            if (message_size >= HEADER_SIZE) {
                counter = load_le64((const unsigned char *)PyBytes_AS_STRING(message) + 8);
            }
        } else {
            Py_buffer header;
            if (PyObject_GetBuffer(message, &header, PyBUF_SIMPLE) < 0) {
                goto done;
            }
            message_size = header.len;
            if (message_size >= HEADER_SIZE) {
                counter = load_le64((const unsigned char *)header.buf + 8);
            }
            PyBuffer_Release(&header);
        }
        int short_message = message_size < HEADER_SIZE;
        if (plaintext == Py_None) {
            failed++;
            rejected_bytes += message_size;
            continue;
        }
        if (!PyBytes_Check(plaintext)) {
            PyErr_SetString(PyExc_TypeError, "accept_transport_run: a plaintext must be bytes or None");
            goto done;
        }
        if (short_message) {
            /* open_batch never authenticates these; the reference reads their counter from fewer than 8 bytes. */
            PyErr_SetString(PyExc_ValueError, "accept_transport_run: an opened message is shorter than its header");
            goto done;
        }
        if (!replay_accept(blocks, &last, limit, counter)) {
            replayed++;
            rejected_bytes += message_size;
            continue;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(plaintext);
        Py_ssize_t size = PyBytes_GET_SIZE(plaintext);
        if (!size) {
            keepalives++;
            continue;
        }
        Py_ssize_t length, offset, address_size;
        int version = p[0] >> 4;
        if (version == 4 && size >= 20) {
            length = ((Py_ssize_t)p[2] << 8) | p[3];
            if (length < 20 || length > size) {
                invalid++;
                continue;
            }
            offset = 12;
            address_size = 4;
        } else if (version == 6 && size >= 40) {
            length = 40 + (((Py_ssize_t)p[4] << 8) | p[5]);
            if (length > size) {
                invalid++;
                continue;
            }
            offset = 8;
            address_size = 16;
        } else {
            invalid++;
            continue;
        }
        PyObject *packet = length < size ? PyBytes_FromStringAndSize((const char *)p, length) : Py_NewRef(plaintext);
        if (packet == NULL) {
            goto done;
        }
        int appended = PyList_Append(packets, packet);
        Py_DECREF(packet);
        if (appended < 0) {
            goto done;
        }
        if (source_size != address_size || memcmp(source, p + offset, (size_t)address_size) != 0) {
            /* A new source: the open run ends before this packet. */
            if (source_size && append_run(sources, PyList_GET_SIZE(packets) - 1, source, source_size) < 0) {
                goto done;
            }
            memcpy(source, p + offset, (size_t)address_size);
            source_size = address_size;
        }
    }
    if (source_size && append_run(sources, PyList_GET_SIZE(packets), source, source_size) < 0) {
        goto done;
    }
    result = Py_BuildValue("(OOKLLLLL)", packets, sources, (unsigned long long)last, failed, replayed, rejected_bytes,
                           invalid, keepalives);
done:
    Py_XDECREF(packets);
    Py_XDECREF(sources);
    Py_XDECREF(plaintexts);
    Py_XDECREF(messages);
    PyBuffer_Release(&ring);
    return result;
}

/* --- split_datagrams --------------------------------------------------------------------------------------------- */

PyDoc_STRVAR(split_datagrams_doc,
             "split_datagrams(buffer, size, segment_size, source, /) -> list[tuple[bytes, object]]\n\n"
             "The first ``size`` bytes of ``buffer`` (one UDP GRO read) cut into datagrams of ``segment_size`` bytes\n"
             "(the last may be shorter), each paired with ``source``: one copy out of the receive buffer.");

static PyObject *split_datagrams(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "split_datagrams(buffer, size, segment_size, source) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t segment_size = PyLong_AsSsize_t(args[2]);
    if (segment_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (size < 0 || size > view.len) {
        PyErr_SetString(PyExc_ValueError, "split_datagrams: size must be within the buffer");
        goto done;
    }
    if (segment_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "split_datagrams: segment_size must be positive");
        goto done;
    }
    result = PyList_New(size / segment_size + (size % segment_size != 0));
    if (result == NULL) {
        goto done;
    }
    const char *data = view.buf;
    for (Py_ssize_t start = 0, i = 0; start < size; start += segment_size, i++) {
        Py_ssize_t length = size - start < segment_size ? size - start : segment_size;
        PyObject *datagram = PyBytes_FromStringAndSize(data + start, length);
        PyObject *pair = datagram != NULL ? PyTuple_Pack(2, datagram, args[3]) : NULL;
        Py_XDECREF(datagram);
        if (pair == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, pair);
    }
done:
    PyBuffer_Release(&view);
    return result;
}

/* --- module ------------------------------------------------------------------------------------------------------ */

static PyMethodDef native_methods[] = {
    {"seal_batch", (PyCFunction)(void (*)(void))seal_batch, METH_FASTCALL, seal_batch_doc},
    {"open_batch", (PyCFunction)(void (*)(void))open_batch, METH_FASTCALL, open_batch_doc},
    {"ones_complement_sum", (PyCFunction)(void (*)(void))ones_complement_sum, METH_FASTCALL,
     ones_complement_sum_doc},
    {"split_gso", (PyCFunction)(void (*)(void))split_gso, METH_FASTCALL, split_gso_doc},
    {"split_gso_frame", split_gso_frame, METH_O, split_gso_frame_doc},
    {"flow_hash", flow_hash, METH_O, flow_hash_doc},
    {"coalesce", (PyCFunction)(void (*)(void))coalesce, METH_FASTCALL, coalesce_doc},
    {"plain_flow_end", (PyCFunction)(void (*)(void))plain_flow_end, METH_FASTCALL, plain_flow_end_doc},
    {"sealed_size", (PyCFunction)(void (*)(void))sealed_size, METH_FASTCALL, sealed_size_doc},
    {"gso_run_ends", (PyCFunction)(void (*)(void))gso_run_ends, METH_FASTCALL, gso_run_ends_doc},
    {"destination_runs", destination_runs, METH_O, destination_runs_doc},
    {"accept_transport_run", (PyCFunction)(void (*)(void))accept_transport_run, METH_FASTCALL,
     accept_transport_run_doc},
    {"split_datagrams", (PyCFunction)(void (*)(void))split_datagrams, METH_FASTCALL, split_datagrams_doc},
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
