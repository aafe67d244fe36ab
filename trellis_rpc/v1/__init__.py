"""Generated from protos/trellis/v1 by `python -m trellis_rpc.codegen`; do not edit."""
