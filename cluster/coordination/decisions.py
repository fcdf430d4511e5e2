"""The HA decisions, pure: no I/O, no clock reads, no trio. The HA loop feeds them what it
read from etcd and the times it measured, and acts on the answers.

Three decisions live here because each is easy to get subtly wrong and each failure
loses acknowledged data:

* **Election** (:func:`election_view`): who may campaign for a group's leadership and
  who is best. Only live members of the *recorded* in-sync set may campaign; a node
  whose last start was not clean campaigns only once it caught up, since that start,
  with the master of the recorded term (KIP-966; :func:`caught_up_since_start`).
  The best is the highest last epoch, then the longest log, then the priority.

  Why a member whose last epoch is *older* than the recorded one stays eligible: a
  master elected in epoch ``e + 1`` may die before any slave received a record of
  ``e + 1``; requiring the current epoch would then leave nobody eligible, for good.
  It is safe because every ack waits for every member of the counted in-sync set
  (:class:`InSyncRecord`): a member still in the recorded set holds every acked
  record, whatever its epoch, and the rank prefers the newer epoch anyway. A member
  claiming an epoch *newer* than the recorded state cannot exist unless etcd's state
  was lost or rolled back, so it is refused loudly.

  **Recovery when every recorded member crashed** (KIP-966's unclean recovery once
  every eligible-replica member is back): a crashed node catches up only with a master,
  so with every member crashed nobody would ever be eligible again. When nobody is
  eligible and *every* member of the recorded in-sync set is live and has published its
  final record of this vacancy, the best of them with any data campaigns anyway. Every
  record acknowledged at ``replicated``/``in_sync`` reached every recorded member (acks
  wait for the counted set, the recorded set shrinks only by a committed CAS and grows
  only by members past every acked offset), so the best of *all* of them holds every
  acked record that survived anywhere; while one is missing it may hold more, so the
  others wait for it (:attr:`ElectionView.waiting_for`).
* **Fencing** (:class:`LeaseFence`): a master's self-fencing deadline, the send time of
  its last successful keepalive + TTL - margin. A paused process cannot know that its
  lease expired, so it must stop acknowledging on its own clock.
* **Recorded in-sync set** (:class:`InSyncRecord`): a shrink counts once its
  compare-and-swap committed, an expansion at once; while a change is pending, acks
  wait for the union of the old and new sets.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import attrs

from cluster.coordination.keys import GroupState, MemberInfo

__all__ = [
    "Candidate",
    "ElectionView",
    "ForgetRefused",
    "InSyncRecord",
    "Ineligible",
    "LeaseFence",
    "PendingOutcome",
    "caught_up_since_start",
    "election_view",
    "fencing_deadline_s",
    "members_to_record",
    "state_after_election",
    "state_after_forgetting",
    "timing_problems",
]


# ---------------------------------------------------------------------------- election


@attrs.frozen
class Candidate:
    """What the election needs to know about one live member (from its member key)."""

    node: str
    epoch: int
    """The last epoch in the node's epoch file."""
    log_end: int
    priority: int = 0
    clean_start: bool = True
    caught_up: bool = False
    vacant_state_revision: int = 0
    """The revision of the group state the node saw with no leader when it published
    this record (0: it saw a leader). Equal to the current state's revision, the record
    holds the node's final log end of this vacancy, written by its current process."""

    @classmethod
    def from_member(cls, info: MemberInfo) -> Candidate:
        return cls(
            node=info.node,
            epoch=info.epoch,
            log_end=info.log_end,
            priority=info.priority,
            clean_start=info.clean_start,
            caught_up=info.caught_up,
            vacant_state_revision=info.vacant_state_revision,
        )

    @property
    def holds_data(self) -> bool:
        """False for a log that is empty and has no epoch history (a wiped data dir):
        it knows nothing of the group, not even that the group is empty."""
        return self.epoch > 0 or self.log_end > 0

    def rank(self) -> tuple[int, int, int, str]:
        """Sort key, best first: highest epoch, longest log, highest priority, then the
        lowest name so every node that sees the same members picks the same best."""
        return (-self.epoch, -self.log_end, -self.priority, self.node)


class Ineligible(enum.Enum):
    """Why a live member may not campaign."""

    NOT_IN_SYNC = "not in the recorded in-sync set"
    EPOCH_AHEAD = "its last epoch is newer than the recorded state's (etcd state lost?)"
    CRASHED_NOT_CAUGHT_UP = (
        "did not start clean (a crash, or an empty log in a group elected before) and has "
        "not caught up with the recorded term's master since"
    )
    NO_STATE = "the group has no recorded state and this node did not start clean"


@attrs.frozen
class ElectionView:
    """The election as one node sees it: ``eligible`` best first, ``refused`` with a
    reason for every other live member, ``best`` the one that should campaign.

    ``recovered``: nobody was eligible by the ordinary rule and ``eligible`` holds the
    recorded members that may lead the recovery of a group whose every member crashed.
    ``waiting_for``: with nobody eligible, the recorded in-sync members that are not
    live (or have not published their final record yet): one of them may hold acked
    records the others lost, so the recovery waits for all of them. ``no_data``: every
    recorded member is back and none holds any data (every data dir wiped).
    Invariant: ``best`` is None whenever ``waiting_for`` or ``no_data`` is set.
    """

    eligible: tuple[Candidate, ...]
    refused: Mapping[str, Ineligible]
    best: str | None
    recovered: bool = False
    waiting_for: frozenset[str] = frozenset()
    no_data: bool = False

    def __attrs_post_init__(self) -> None:
        assert self.best is None or not (self.waiting_for or self.no_data), self

    def may_campaign(self, node: str) -> bool:
        return node == self.best

    def reason(self) -> str:
        """Why the election stands where it does, for logs and the status view."""
        if self.waiting_for:
            return (
                f"waiting for recorded in-sync members {', '.join(sorted(self.waiting_for))} "
                "to return: every member crashed and one of them may hold acked records the "
                "others lost"
            )
        if self.no_data:
            return (
                "every recorded in-sync member is back with an empty log and no epoch "
                "history: the group's records are lost; to start it afresh delete its state "
                "key in etcd and restart the nodes"
            )
        if self.best is None:
            return "no live member is eligible"
        if self.recovered:
            return f"{self.best} leads the recovery: every recorded in-sync member is back"
        return f"{self.best} is the best eligible member"


def _refusal(state: GroupState | None, candidate: Candidate) -> Ineligible | None:
    if state is None:
        return None if candidate.clean_start else Ineligible.NO_STATE
    if candidate.node not in state.in_sync:
        return Ineligible.NOT_IN_SYNC
    if candidate.epoch > state.epoch:
        return Ineligible.EPOCH_AHEAD
    if not (candidate.clean_start or candidate.caught_up):
        return Ineligible.CRASHED_NOT_CAUGHT_UP
    return None


def caught_up_since_start(
    node: str,
    *,
    latched: bool,
    caught_up_epoch: int | None,
    state: GroupState | None,
) -> bool:
    """Whether ``node``, restarted after a crash (or started empty into a group that was
    elected before), may campaign again: KIP-966's re-admission, judged on local facts.

    True once, since this start, the node followed the master of ``caught_up_epoch`` up
    to that master's log end as of the handshake (``caught_up_epoch``, kept after the
    connection ends) and the recorded state of that same epoch names it; or when it
    ``latched`` before (it did so in an earlier term, or it was elected: this process
    has not crashed since, so it is as good as a clean start).

    Why that suffices: every record acked before the handshake was in the master's log
    then, so the node holds it; every record acked after it waited for the node while it
    was recorded (a recorded member counts for acks), and one re-added after a shrink
    was re-admitted only with an ack at the confirm offset. A record acked before a
    crash of this node and missing now is therefore covered by the handshake's end.

    Why it must not depend on the connection still being up, or on the node having
    *seen* the state while connected: a master that records the node and dies at once
    would otherwise take the proof with it and leave every slave ineligible for good.
    Why the epoch must match: the proof is about one master's log and the acks that
    master counted; a state of another term may still name the node from before its
    crash (a shrink not recorded yet), which proves nothing about what it holds now.
    """
    if latched:
        return True
    return (
        state is not None
        and caught_up_epoch is not None
        and caught_up_epoch == state.epoch
        and node in state.in_sync
    )


def election_view(
    state: GroupState | None,
    live: Iterable[Candidate],
    *,
    preferred: str | None = None,
    state_revision: int = 0,
) -> ElectionView:
    """Who may campaign and who is best, given the recorded ``state`` (None: the group
    was never elected), its etcd ``state_revision`` and the ``live`` members (those with
    a member key).

    With no recorded state (a new cluster), every live member that started clean may
    campaign. ``preferred`` (a switchover target) is best when it is eligible and holds
    as long a log in as high an epoch as the best; otherwise the rank decides. With
    nobody eligible, :func:`_recovery` decides.
    """
    live = list(live)
    eligible: list[Candidate] = []
    refused: dict[str, Ineligible] = {}
    for candidate in live:
        reason = _refusal(state, candidate)
        if reason is None:
            eligible.append(candidate)
        else:
            refused[candidate.node] = reason
    if not eligible and state is not None:
        return _recovery(state, state_revision, live, refused)
    eligible.sort(key=Candidate.rank)
    best = eligible[0].node if eligible else None
    if preferred is not None and eligible:
        for candidate in eligible:
            if candidate.node == preferred and candidate.rank()[:2] == eligible[0].rank()[:2]:
                best = preferred
    return ElectionView(eligible=tuple(eligible), refused=refused, best=best)


def _recovery(
    state: GroupState,
    state_revision: int,
    live: list[Candidate],
    refused: dict[str, Ineligible],
) -> ElectionView:
    """Nobody is eligible by the ordinary rule: may the best recorded member lead anyway?

    Only when every recorded in-sync member is live with a record it wrote after seeing
    this vacancy (``vacant_state_revision == state_revision``: its final log end, from
    its current process; an earlier life's record may lag its log) and none was refused
    for anything but its crash. Then the best of those holding data holds every acked
    record that survived anywhere. Members with no data at all (a wiped data dir) never
    lead: if they are all there is, the acked records are gone and electing one would
    present an erased history as healthy (and start consumers over), so the group waits
    for an operator instead (``no_data``).
    """
    reporting = {
        candidate.node: candidate
        for candidate in live
        if candidate.node in state.in_sync
        and state_revision > 0
        and candidate.vacant_state_revision == state_revision
    }
    missing = frozenset(state.in_sync - reporting.keys())
    if missing:
        return ElectionView((), refused, None, waiting_for=missing)
    if any(refused.get(node) is not Ineligible.CRASHED_NOT_CAUGHT_UP for node in reporting):
        return ElectionView((), refused, None)  # an epoch ahead: etcd's state is suspect
    leaders = sorted(
        (candidate for candidate in reporting.values() if candidate.holds_data),
        key=Candidate.rank,
    )
    if not leaders:
        return ElectionView((), refused, None, no_data=True)
    best = leaders[0].node
    others = {node: reason for node, reason in refused.items() if node != best}
    return ElectionView((leaders[0],), others, best, recovered=True)


def state_after_election(
    state: GroupState | None, view: ElectionView, winner: str, *, min_insync_replicas: int = 1
) -> GroupState:
    """The state the winner writes in its election transaction.

    The epoch goes up by one (above every live member's epoch when there was no
    state). The new in-sync set is the winner plus the other eligible members: they
    hold every acked record (acks waited for them) and the new master truncates any
    tail of theirs it does not hold; anyone else must be re-admitted by the new master.
    After a recovery the set is the winner alone: the others crashed and may have lost
    records the winner holds, so they must catch up and be re-admitted
    (:func:`members_to_record`) before they count or may be elected again.
    """
    names = {candidate.node for candidate in view.eligible}
    if winner not in names or winner in view.refused:
        raise ValueError(f"{winner!r} is not eligible: {view.refused.get(winner, 'not live')}")
    if state is None:
        epoch = max(candidate.epoch for candidate in view.eligible) + 1
        return GroupState(epoch, winner, frozenset({winner}), min_insync_replicas)
    in_sync = frozenset({winner}) if view.recovered else frozenset(names)
    return GroupState(state.epoch + 1, winner, in_sync, state.min_insync_replicas)


class ForgetRefused(ValueError):
    """An operator's request to drop a member from the recorded in-sync set was refused;
    the message says why and what to do instead."""


def state_after_forgetting(
    state: GroupState | None, node: str, *, live: Iterable[str], leader: str | None
) -> GroupState:
    """The state an operator writes to drop ``node``, lost for good, from the recorded
    in-sync set of a leaderless group (Kafka's unclean recovery without waiting for
    every eligible replica: an operator's call, never the loop's).

    A group whose every member crashed waits for each recorded member to return
    (:func:`_recovery`); if one never will (its disk is gone), nobody leads. Dropping it
    lets the best of the others lead. What it risks: a record acknowledged while only
    the forgotten member held it durably (``acks=in_sync`` with a simultaneous power
    loss of the others) is lost. Refused while a master leads (it manages the set and
    drops a lagging member itself), for a live member (it will be judged by the
    election, or re-admitted), and for the last recorded member (then no member holds
    the group's records: delete the group's state key to start afresh). The epoch stays:
    the next election starts the next term. ``master`` is cleared if it was ``node``.
    """
    if state is None:
        raise ForgetRefused("the group was never elected: there is no in-sync set to change")
    if node not in state.in_sync:
        raise ForgetRefused(
            f"{node} is not in the recorded in-sync set {sorted(state.in_sync)}: nothing to do"
        )
    if leader is not None:
        raise ForgetRefused(
            f"the group has a master ({leader}): it drops a member that falls behind from "
            "the in-sync set on its own; this is for a leaderless group waiting for a member "
            "that will not return"
        )
    if node in set(live):
        raise ForgetRefused(
            f"{node} is live: the election judges it, or the next master re-admits it once "
            "it catches up; stop it first if its data is really lost"
        )
    remaining = state.in_sync - {node}
    if not remaining:
        raise ForgetRefused(
            f"{node} is the last recorded in-sync member: no other member is known to hold "
            "the group's acknowledged records; to start the group afresh (losing them), "
            "delete its state key in etcd and restart the nodes"
        )
    master = None if state.master == node else state.master
    return GroupState(state.epoch, master, remaining, state.min_insync_replicas)


# ----------------------------------------------------------------------------- fencing


def fencing_deadline_s(last_keepalive_sent_s: float, lease_ttl_s: float, margin_s: float) -> float:
    """The time (on the clock ``last_keepalive_sent_s`` was read from) after which a
    master may have lost its lease. Counting from the *send* time is what makes it
    safe: etcd renewed the lease no earlier than that."""
    return last_keepalive_sent_s + lease_ttl_s - margin_s


@attrs.define
class LeaseFence:
    """The master's self-fencing deadline, fed with successful keepalives.

    Invariant: ``deadline_s`` never moves back (a late answer to an old keepalive
    cannot shorten or wrongly extend it: it counts from its own send time). The grant
    of the lease counts as the first keepalive. One owner (the HA loop); the ack path
    only calls :meth:`may_acknowledge`.
    """

    lease_ttl_s: float
    margin_s: float
    last_sent_s: float | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.margin_s < self.lease_ttl_s:
            raise ValueError(
                f"fencing margin {self.margin_s}s must be >= 0 and below the lease TTL "
                f"{self.lease_ttl_s}s"
            )

    def keepalive_succeeded(self, sent_s: float) -> None:
        """A keepalive (or the grant) sent at ``sent_s`` was answered with the lease alive."""
        if self.last_sent_s is None or sent_s > self.last_sent_s:
            self.last_sent_s = sent_s

    @property
    def deadline_s(self) -> float:
        """Minus infinity before the first success: a master with no renewal may not ack."""
        if self.last_sent_s is None:
            return float("-inf")
        return fencing_deadline_s(self.last_sent_s, self.lease_ttl_s, self.margin_s)

    def may_acknowledge(self, now_s: float) -> bool:
        return now_s < self.deadline_s

    def remaining_s(self, now_s: float) -> float:
        return self.deadline_s - now_s


def timing_problems(
    *,
    lease_ttl_s: float,
    keepalive_interval_s: float,
    request_timeout_s: float,
    fencing_margin_s: float,
) -> list[str]:
    """What is wrong with these timings (empty when they are sound).

    Patroni's rule, ``keepalive_interval + 2 x request_timeout <= lease_ttl``, lets one
    timed-out keepalive be retried before the lease can expire. With the fencing margin
    the master stops acknowledging early, so the retry must also be answered before the
    fencing deadline: ``interval + 2 x timeout + margin <= ttl``, else a master fences
    itself after a single slow keepalive.
    """
    problems = [
        f"{name} must be positive, got {value}"
        for name, value in (
            ("lease_ttl_s", lease_ttl_s),
            ("keepalive_interval_s", keepalive_interval_s),
            ("request_timeout_s", request_timeout_s),
        )
        if not value > 0
    ]
    if fencing_margin_s < 0:
        problems.append(f"fencing_margin_s must be >= 0, got {fencing_margin_s}")
    if problems:
        return problems
    patroni_s = keepalive_interval_s + 2 * request_timeout_s
    if patroni_s > lease_ttl_s:
        problems.append(
            f"keepalive_interval_s + 2 x request_timeout_s = {patroni_s:g}s exceeds "
            f"lease_ttl_s = {lease_ttl_s:g}s: a retried keepalive could come after the lease "
            "expired; raise lease_ttl_s or lower the other two"
        )
    elif patroni_s + fencing_margin_s > lease_ttl_s:
        problems.append(
            f"keepalive_interval_s + 2 x request_timeout_s + fencing_margin_s = "
            f"{patroni_s + fencing_margin_s:g}s exceeds lease_ttl_s = {lease_ttl_s:g}s: the "
            "master would fence itself after one slow keepalive; lower fencing_margin_s"
        )
    return problems


# -------------------------------------------------------------- recorded in-sync set


class PendingOutcome(enum.Enum):
    """How a compare-and-swap of the in-sync set ended, as far as the master knows."""

    COMMITTED = "committed"
    REFUSED = "refused"
    """The compare failed: someone else changed the state; re-read before proposing."""


@attrs.define
class InSyncRecord:
    """The master's view of its group's in-sync set: what is recorded in etcd and the
    one change (if any) it is recording.

    * :attr:`counted` is the set an ack must reach: the union of the recorded and the
      pending set. So an expansion counts at once (new members must ack too) and a
      shrink counts only once committed (removed members keep counting until then).
    * A CAS that timed out has an unknown outcome: the change stays pending, and the
      union keeps counting, until a read-back resolves it with :meth:`observed`.

    Invariant: ``recorded`` and ``pending`` always contain the master. One owner (the
    HA loop); the ack path reads :attr:`counted` and :meth:`admits_replicated`.
    """

    master: str
    recorded: frozenset[str]
    min_insync_replicas: int
    pending: frozenset[str] | None = None

    def __attrs_post_init__(self) -> None:
        self._check(self.recorded)

    def _check(self, members: frozenset[str]) -> None:
        if self.master not in members:
            raise ValueError(
                f"in-sync set {sorted(members)} must contain the master {self.master!r}"
            )

    @property
    def counted(self) -> frozenset[str]:
        return self.recorded | self.pending if self.pending is not None else self.recorded

    def propose(self, target: frozenset[str]) -> frozenset[str] | None:
        """Start recording ``target`` (the master's current judgement of who is in sync).

        Returns the set to write with a CAS, or None when nothing is to be written (the
        target is recorded already, or a change is still pending: one at a time, so a
        shrink can never overtake an expansion).
        """
        target = frozenset(target) | {self.master}
        if self.pending is not None or target == self.recorded:
            return None
        self.pending = target
        return target

    def resolve(self, outcome: PendingOutcome) -> None:
        """The CAS answered: committed (the pending set is now recorded) or refused."""
        if self.pending is None:
            raise ValueError("no in-sync change is pending")
        if outcome is PendingOutcome.COMMITTED:
            self.recorded = self.pending
        self.pending = None

    def observed(self, recorded: frozenset[str]) -> None:
        """The set read back from etcd (after a refused or timed-out CAS, or from the
        watch). A pending change equal to it has committed; any other is dropped."""
        self._check(frozenset(recorded))
        self.recorded = frozenset(recorded)
        self.pending = None

    def outcomes(self) -> tuple[frozenset[str], ...]:
        """The sets that may end up recorded: the recorded one, and the pending one."""
        if self.pending is None:
            return (self.recorded,)
        return (self.recorded, self.pending)

    def admits_replicated(self) -> bool:
        """``acks=replicated`` may be accepted: acks wait for :attr:`counted`, a superset of
        every possible outcome, so this holds when each outcome has at least
        ``min_insync_replicas`` slaves (the master not counted)."""
        return all(
            len(members - {self.master}) >= self.min_insync_replicas for members in self.outcomes()
        )


def members_to_record(
    master: str,
    in_sync_acks: Mapping[str, int],
    counted: frozenset[str],
    acked_floor: int,
) -> frozenset[str]:
    """The in-sync set a master should record: itself, every slave of ``in_sync_acks``
    (the replication layer's judgement, ack offsets by name) that is counted already,
    and every other one whose ack reached ``acked_floor``.

    Why the floor: a recorded member may be elected, so it must hold every acked
    record. One counted already does (every ack waited for it). One joining must first
    prove it: its ack offset is the end of a log prefix the two epoch histories showed
    it shares with the master, and ``acked_floor`` -- the caller passes the start of the
    master's term (every record acked in an older term lies below it: the master held
    them when elected) and the confirm offset (every record acked in this term lies
    below it) -- bounds every acked record. Without it a slave that reconnected far
    behind would be recorded at once and could be elected without records that were
    acknowledged as replicated (Kafka admits a follower to the ISR only once it reached
    the high watermark for the same reason).
    """
    joining = {
        name
        for name, ack in in_sync_acks.items()
        if name != master and (name in counted or ack >= acked_floor)
    }
    return frozenset(joining | {master})
