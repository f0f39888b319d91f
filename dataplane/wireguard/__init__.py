"""WireGuard as sans-IO state machines (issue 3).

- ``crypto``: BLAKE2s HASH/MAC/HMAC/KDF, X25519, (X)ChaCha20-Poly1305, TAI64N.
- ``noise``: the Noise_IKpsk2 handshake as pure functions; ``messages``: wire formats of types 1-4.
- ``cookie``: mac1/mac2 and cookie replies; ``ratelimit``: per-source token bucket under load.
- ``replay``: the 8128-counter anti-replay window; ``session``: a transport keypair with cached AEADs.
- ``timers``: per-peer deadlines named after wireguard-go's hooks; ``tunn``: one peer (handshake, keypairs, timers).
- ``allowedips``: longest-prefix match; ``device``: many peers, cryptokey routing, load, roaming.
- ``uapi``: the `wg` configuration protocol over a Device (owned with ``agent/wg.py``).
"""
