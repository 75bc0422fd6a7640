"""The LRP core: rules, the one generic custom-gradient pass, the handler registry, canonizers,
composites and presets, and the planner that turns a front end's neutral graph into the
rewritten forward pass. It imports no Keras package and nothing of the product around it."""
