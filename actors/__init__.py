"""Stages, one module per model role. pyproject.toml declares each as a `factory.stages`
entry point; `factory.stage.get_stage` imports a module the first time a recipe names one
of its stages, so loading a recipe that only renders never imports torch's model stacks."""
