#!/usr/bin/env bash
# The whole road on one machine, with real components: keys and a trust store; the example
# model converted for a Raspberry Pi and signed as two releases; a local Mosquitto; one real
# edgekit-agent (serving v1 over the Open Inference Protocol) and a dozen simulated devices;
# the Prometheus exporter; a canary rollout of v1.1.0 gated on the devices' health; then
# inference on the agent, now answered by v1.1.0. Everything lives in one temp folder
# ($DEMO_DIR to choose it) and every process is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[convert,agent,fleet,examples]'
export PATH="$PWD/.venv/bin:$PATH"

export DEMO=${DEMO_DIR:-$(mktemp -d /tmp/edgekit-demo.XXXXXX)}
mkdir -p "$DEMO"
export EDGEKIT_HOME="$DEMO/home" EDGEKIT_KEY_PASSPHRASE=demo-passphrase
export EDGEKIT_FLEET=demo
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
wait_for() {  # wait_for SECONDS COMMAND...: retry until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.5
  done
}

step "1. keys (root, release signer, directive signer) and a trust store devices are provisioned with"
for key in root release ops; do edgekit keys generate "$key"; done
edgekit trust init --root-key root --bundles-key release --directives-key ops \
  -o "$DEMO/truststore.json"

step "2. train the example digits CNN, convert it for raspberrypi, sign releases 1.0.0 and 1.1.0"
python -m edgekit.converters.examples "$DEMO/example"
edgekit convert "$DEMO/example/digits_cnn.onnx" --profile raspberrypi -o "$DEMO/out" \
  --calibration "$DEMO/example/calibration.npz" --validation "$DEMO/example/validation.npz"
for version in 1.0.0 1.1.0; do
  edgekit bundle build "$DEMO/out" --name digits --version "$version" --sign release \
    -o "$DEMO/bundles"
done
V1="$DEMO/bundles/digits-1.0.0-raspberrypi.ekb"
V2="$DEMO/bundles/digits-1.1.0-raspberrypi.ekb"
edgekit bundle verify "$V2" --trust "$DEMO/truststore.json"

step "3. a local Mosquitto (anonymous, 127.0.0.1, a free port)"
python -m edgekit.mosquitto "$DEMO/broker" > "$DEMO/broker.url" &
pids+=($!)
wait_for 10 test -s "$DEMO/broker.url"
export EDGEKIT_BROKER_URL
EDGEKIT_BROKER_URL=$(head -1 "$DEMO/broker.url")
echo "broker: $EDGEKIT_BROKER_URL"

step "4. one real edgekit-agent, factory-installed with 1.0.0, serving on 127.0.0.1:18080"
cat > "$DEMO/agent.toml" <<EOF
device_id = "pi-0001"
fleet = "demo"
profile = "raspberrypi"
group = "lab"
truststore = "$DEMO/truststore.json"
data_dir = "$DEMO/agent-data"
inference_address = "127.0.0.1:18080"
initial_bundle = "$V1"

[mqtt]
url = "$EDGEKIT_BROKER_URL"

[update]
probation_s = 3

[telemetry]
interval_s = 2
EOF
edgekit-agent run --config "$DEMO/agent.toml" > "$DEMO/agent.log" 2>&1 &
pids+=($!)
wait_for 60 curl -sf http://127.0.0.1:18080/v2/health/ready
curl -s http://127.0.0.1:18080/v2/models/model && echo

step "5. twelve simulated devices (real MQTT clients, real verification) and the exporter"
edgekit fleet simulate --fleet demo --broker "$EDGEKIT_BROKER_URL" --devices 12 --trust "$DEMO/truststore.json" --profile raspberrypi \
  --telemetry-interval 2 > "$DEMO/simulate.log" 2>&1 &
pids+=($!)
edgekit monitor --fleet demo --listen 127.0.0.1:19108 --broker "$EDGEKIT_BROKER_URL" --username "" \
  > "$DEMO/monitor.log" 2>&1 &
pids+=($!)
sleep 3
edgekit fleet devices

step "6. canary rollout of 1.1.0: a 25% canary wave, then the rest, each gated on health"
edgekit fleet rollout "$V2" --key ops --truststore "$DEMO/truststore.json" \
  --strategy canary --canary 25% --max-failure 0% --soak 5s --report-timeout 2m
edgekit fleet devices

step "7. the agent now answers with 1.1.0"
python - <<'EOF'
import json, urllib.request
import numpy as np

x = np.load(__import__("os").environ["DEMO"] + "/example/validation.npz")
name = list(x.keys())[0]
sample = x[name][:1].astype("float32")
body = {"inputs": [{"name": name, "shape": list(sample.shape), "datatype": "FP32",
                    "data": sample.ravel().tolist()}]}
request = urllib.request.Request(
    "http://127.0.0.1:18080/v2/models/model/infer", json.dumps(body).encode(),
    {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(request))
scores = reply["outputs"][0]["data"]
print(f"model {reply['model_name']} version {reply['model_version']}: "
      f"predicted digit {int(np.argmax(scores))}")
EOF
edgekit-agent status --config "$DEMO/agent.toml"

step "8. what Prometheus would scrape"
curl -s http://127.0.0.1:19108/metrics \
  | grep -E '^edgekit_(monitor_devices|inference_requests_total|update_events_total)\{' \
  | grep -E 'pi-0001|monitor_devices' | head -12 || true
echo
echo "everything is in $DEMO (agent.log, simulate.log, monitor.log, bundles/, out/report.json)"
