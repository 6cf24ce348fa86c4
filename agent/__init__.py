"""The device agent (edgekit-agent); see DESIGN.md "Agent state machine" and docs/agent.md.

Modules: `config` (TOML + environment), `store` (slots, pointer, floor, bad bundles),
`journal` (crash-safe transitions), `updater` (the state machine), `health` (on-device
checks), `download` (MQTT chunks and HTTPS with resume), `mqtt` (the broker session),
`daemon` (wiring, telemetry), `cli` (`edgekit-agent`); serving: `serving`, `oip`,
`telemetry`, `queue`.
"""
