"""Callbacks that make routing visible during training."""

from keras_moe.callbacks._stats import effective_num_experts, moe_layers
from keras_moe.callbacks.routing_metrics import RoutingMetrics
from keras_moe.callbacks.routing_monitor import RoutingMonitor

__all__ = ["RoutingMetrics", "RoutingMonitor", "effective_num_experts", "moe_layers"]
