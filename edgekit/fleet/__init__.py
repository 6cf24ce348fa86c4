"""The operator side: device registry, rollouts, broker config, simulator, monitor."""
