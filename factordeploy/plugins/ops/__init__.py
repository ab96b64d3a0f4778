"""One module per plugin op; each calls factordeploy.plugins.register_op(OpSpec(...)) at import."""
