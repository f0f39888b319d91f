"""ICE for Firezone connections: candidates (SDP values, priorities) and a sans-IO agent (RFC 8445 + RFC 7675)."""

from dataplane.ice.agent import (
    AgentDirectory,
    CandidatePair,
    DropReason,
    IceAgent,
    IceConnected,
    IceDisconnected,
    IceEvent,
    IceFailed,
    IceState,
    PairState,
    PeerReflexiveCandidateLearned,
    RoleChanged,
    SelectedPairChanged,
    pair_priority,
)
from dataplane.ice.candidate import (
    Candidate,
    CandidateKind,
    CandidateParseError,
    compute_foundation,
    compute_priority,
)
from dataplane.ice.timing import (
    CLIENT_PROFILE,
    SERVER_PROFILE,
    IceTimingProfile,
    StunTiming,
)

__all__ = [
    "AgentDirectory",
    "CLIENT_PROFILE",
    "SERVER_PROFILE",
    "Candidate",
    "CandidateKind",
    "CandidatePair",
    "CandidateParseError",
    "DropReason",
    "IceAgent",
    "IceConnected",
    "IceDisconnected",
    "IceEvent",
    "IceFailed",
    "IceState",
    "IceTimingProfile",
    "PairState",
    "PeerReflexiveCandidateLearned",
    "RoleChanged",
    "SelectedPairChanged",
    "StunTiming",
    "compute_foundation",
    "compute_priority",
    "pair_priority",
]
