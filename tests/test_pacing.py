"""The study's answer in MLflow, paced (dora_lab.study.pacing): posted after a trial only when its last
post cost at most a tenth of the time since (issue 27)."""

from __future__ import annotations

from dora_lab.study.pacing import Paced


class Clock:
    """A clock the test moves by hand; a post takes ``cost`` seconds on it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_answer_is_posted_at_a_tenth_of_the_time() -> None:
    clock, posts = Clock(), []

    def post() -> None:  # a post that takes 2 s
        posts.append(clock.now)
        clock.now += 2.0

    paced = Paced(post, share=0.1, clock=clock)
    paced()  # the first trial's: always
    assert posts == [100.0]
    for gap in (5.0, 10.0, 4.9):  # 19.9 s after the post ended (at 102): 2 > 0.1 * 19.9, not yet
        clock.now += gap
        paced()
    assert posts == [100.0]
    clock.now += 0.1  # 20 s since: 2 <= 0.1 * 20
    paced()
    assert posts == [100.0, 122.0]
    clock.now += 1.0
    paced()  # 1 s after the second post: skipped again
    assert len(posts) == 2


def test_a_cheap_post_goes_out_after_every_trial() -> None:
    clock, posts = Clock(), []
    paced = Paced(lambda: posts.append(clock.now), share=0.1, clock=clock)  # takes no time on the clock
    for _ in range(5):
        clock.now += 30.0
        paced()
    assert len(posts) == 5
