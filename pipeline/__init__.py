"""The core: settings, models, planning, task execution, datasets, policies, the API and the CLI."""
