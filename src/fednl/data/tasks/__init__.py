"""Task builders: each turns a task config into its natural clients (see ``fednl.data.build``)."""
