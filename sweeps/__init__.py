"""lora-sweep's engine: configs, data, models, the trial trainer, search strategies, tracking, CLI."""
