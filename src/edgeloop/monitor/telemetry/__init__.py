"""Privacy-respecting telemetry: what a device tells its fleet's collector.

A device turns plain observations (predicted-class counts, a drift flag, a mean
confidence) into a report of local-DP mechanism outputs
(:mod:`~edgeloop.monitor.telemetry.mechanisms`), charges its owner's ε budget
(:mod:`~edgeloop.monitor.telemetry.ledger`), signs the report with its key and sends it
(:mod:`~edgeloop.monitor.telemetry.client`). The collector (:mod:`edgeloop.serve.telemetry`)
checks and stores reports (:mod:`~edgeloop.monitor.telemetry.report`) and de-biases them into
fleet estimates (:mod:`~edgeloop.monitor.telemetry.estimate`).

Everything here runs on the plain device install (no torch, no OpenDP, no SQLAlchemy).
"""

from edgeloop.monitor.telemetry.client import DeviceKey, Reporter, SendResult, create_key, read_key
from edgeloop.monitor.telemetry.estimate import Estimate, FleetSummary, summarize
from edgeloop.monitor.telemetry.ledger import Budget, Ledger, Spend, parse_period
from edgeloop.monitor.telemetry.mechanisms import (
    Gaussian,
    Laplace,
    RandomizedResponse,
    UnaryEncoding,
    categorical,
)
from edgeloop.monitor.telemetry.report import (
    BadReport,
    Observation,
    Report,
    ReportConfig,
    parse_report,
)

__all__ = ["BadReport", "Budget", "DeviceKey", "Estimate", "FleetSummary", "Gaussian",
           "Laplace", "Ledger", "Observation", "RandomizedResponse", "Report",
           "ReportConfig", "Reporter", "SendResult", "Spend", "UnaryEncoding", "categorical",
           "create_key", "parse_period", "parse_report", "read_key", "summarize"]
