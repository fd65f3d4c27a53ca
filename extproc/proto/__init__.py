"""Generated protobuf/gRPC code for the relay's own API (`proto/relay/v1/relay.proto`).

Never edit the generated files; regenerate them from the repository root with

    python -m grpc_tools.protoc -Iproto --python_out=extproc/proto --pyi_out=extproc/proto \
        --grpc_python_out=extproc/proto proto/relay/v1/relay.proto
    sed -i 's/^from relay.v1 import/from extproc.proto.relay.v1 import/' \
        extproc/proto/relay/v1/relay_pb2_grpc.py

tests/test_readers.py reruns exactly this and fails if the committed files differ.
"""
