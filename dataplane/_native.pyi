from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

disabled_by_environment: bool
openssl_version: str

def seal_batch(
    key: Buffer, receiver_index: int, first_counter: int, packets: Sequence[Buffer], mtu: int | None, /
) -> list[bytes]: ...
def open_batch(key: Buffer, messages: Sequence[Buffer], /) -> list[bytes | None]: ...
def ones_complement_sum(data: Buffer, initial: int = 0, /) -> int: ...
