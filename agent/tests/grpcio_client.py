"""A gRPC C-core client (Python grpcio) for agent/tests/service.rs.

It dials the socket the way Python, C++ and Java clients do by default,
`grpc.insecure_channel("unix:///path")` with no options, so C-core sends the
percent-encoded socket path as `:authority`. Messages are encoded by hand
(no generated stubs): the test must exercise the wire, not a codegen step.

    grpcio_client.py SOCKET CALL...

Each CALL prints one JSON line:
    info                          -> {"name": ..., "vendor_version": ...}
    delta BASE TARGET MAX_RESULTS -> {"messages": [[type, capacity, [[offset, size], ...]], ...]}
    admin-begin VOLUME            -> {"cut_id": ...}      (the admin socket's API)
    admin-delete HANDLE           -> {}
An id written `@N` is N bytes of "x". A call that fails prints
{"error": CODE_NAME, "details_bytes": N, "details_head": first 200 chars}.
"""

import json
import sys

import grpc


def varint(n):
    n &= (1 << 64) - 1  # int64 on the wire: two's complement in 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number, data):
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, n):
    return varint(number << 3) + varint(n)


def parse(data):
    """Protobuf fields as (number, value) with value an int or bytes."""
    i, fields = 0, []
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            n, i = read_varint(data, i)
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"unexpected wire type {wire}")
        fields.append((number, value))
    return fields


def read_varint(data, i):
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def signed(n):
    return n - (1 << 64) if n >= 1 << 63 else n


def ident(arg):
    return b"x" * int(arg[1:]) if arg.startswith("@") else arg.encode()


def info(channel):
    call = channel.unary_unary("/csi.v1.Identity/GetPluginInfo")
    fields = dict(parse(call(b"", timeout=30)))
    return {"name": fields.get(1, b"").decode(), "vendor_version": fields.get(2, b"").decode()}


def delta(channel, base, target, max_results):
    request = field_bytes(1, ident(base)) + field_bytes(2, ident(target))
    if int(max_results):
        request += field_varint(4, int(max_results))
    call = channel.unary_stream("/csi.v1.SnapshotMetadata/GetMetadataDelta")
    messages = []
    for response in call(request, timeout=60):
        ty = capacity = 0
        tuples = []
        for number, value in parse(response):
            if number == 1:
                ty = value
            elif number == 2:
                capacity = signed(value)
            elif number == 3:
                t = dict(parse(value))
                tuples.append([signed(t.get(1, 0)), signed(t.get(2, 0))])
        messages.append([ty, capacity, tuples])
    return {"messages": messages}


def admin_begin(channel, volume):
    call = channel.unary_unary("/cbt.admin.v1.Admin/BeginSnapshot")
    return {"cut_id": dict(parse(call(field_bytes(1, ident(volume)), timeout=30))).get(1, 0)}


def admin_delete(channel, handle):
    call = channel.unary_unary("/cbt.admin.v1.Admin/DeleteSnapshot")
    call(field_bytes(1, ident(handle)), timeout=30)
    return {}


def main():
    socket, calls = sys.argv[1], sys.argv[2:]
    # Default options on purpose: this is what a client author writes first.
    with grpc.insecure_channel("unix://" + socket) as channel:
        while calls:
            name = calls.pop(0)
            try:
                if name == "info":
                    result = info(channel)
                elif name == "delta":
                    result = delta(channel, calls.pop(0), calls.pop(0), calls.pop(0))
                elif name == "admin-begin":
                    result = admin_begin(channel, calls.pop(0))
                elif name == "admin-delete":
                    result = admin_delete(channel, calls.pop(0))
                else:
                    raise SystemExit(f"unknown call {name}")
            except grpc.RpcError as e:
                details = e.details() or ""
                result = {
                    "error": e.code().name,
                    "details_bytes": len(details.encode()),
                    "details_head": details[:200],
                }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
