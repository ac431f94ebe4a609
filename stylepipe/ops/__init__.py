"""Operations around the library: the loopback production stack, the processes of a machine and
how they share its cores, the servers' health probes. The library (nets, data, train, search,
the stages) never imports from here (tests/test_house.py): the commands wire it in."""
