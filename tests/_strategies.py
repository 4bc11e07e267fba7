"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

# Header values the broker stores and gives back as they are (AMQP field-table types).
HEADER_VALUES = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.booleans(),
    st.lists(st.text(max_size=10), max_size=3),
)
