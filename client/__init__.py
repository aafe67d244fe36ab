"""The `trellis` command line client and the local process launcher. Talks to the router only
through the generated stubs, as any other client would."""
