"""The device agent (edgekit-agent); see DESIGN.md "Agent state machine"."""
