"""Tests of the contract through HTTP and the CLI (see SPEC sections 1-3, 5, 6)."""
from __future__ import annotations

import mmoref_server as mm

SPEC_BODY = (b'{"event":"registered","token":"tok_abc","server_id":"srv_123","referee_identity":"player-7842",'
             b'"server_event_id":"reg-7842","ts":1733500000}')


def test_spec_test_vector():
    expected = "cad864e0418dc3421633cb0dc39358c84f8397f831787132bbf721f0ff77625b"
    assert mm.sign("test-secret", 1733500000, SPEC_BODY) == expected
