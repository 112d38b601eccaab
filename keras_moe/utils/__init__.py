"""Private helpers shared by several packages of keras_moe (not public API).

They sit at the bottom of the package (they import only Keras and NumPy),
so that ops, layers, losses, metrics, callbacks and the tools can all use
them without importing each other sideways or upwards:

- `validation`: argument checks whose messages name the bad value and say
  what is expected.
- `keras_internals`: every use of private Keras API, each with the reason
  there is no public one.
- `layouts`: the current distribution's layout of a layer's tensors.
- `tensors`: small tensor helpers (`concrete_values`).
- `replicas`: sums over data-parallel replicas, so that the routing
  statistics, balancing losses and routing state are the global batch's
  (the one module here that imports a backend, lazily, for its collective).
"""
