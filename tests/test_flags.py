"""pyflannel.flags: flanneld v0.20.2's command line and FLANNELD_* environment."""

from __future__ import annotations

import pytest

from pyflannel.flags import (FlagError, HelpRequested, continue_when_cache_not_ready, describe, event_queue_depth, parse,
                            usage)

# spec §8: flanneld v0.20.2's line for `--kube-subnet-mgr --iface=eth1 --ip-masq`.
REFERENCE_LINE = (
    "CLI flags config: {etcdEndpoints:http://127.0.0.1:4001,http://127.0.0.1:2379 "
    "etcdPrefix:/coreos.com/network etcdKeyfile: etcdCertfile: etcdCAFile: etcdUsername: "
    "etcdPassword: version:false kubeSubnetMgr:true kubeApiUrl: "
    "kubeAnnotationPrefix:flannel.alpha.coreos.com kubeConfigFile: iface:[eth1] ifaceRegex:[] "
    "ipMasq:true ifaceCanReach: subnetFile:/run/flannel/subnet.env publicIP: publicIPv6: "
    "subnetLeaseRenewMargin:60 healthzIP:0.0.0.0 healthzPort:0 iptablesResyncSeconds:5 "
    "iptablesForwardRules:true netConfPath:/etc/kube-flannel/net-conf.json "
    "setNodeNetworkUnavailable:true}"
)


def error(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(FlagError) as exc:
        parse(argv, environ or {})
    return str(exc.value)


def test_defaults() -> None:
    o = parse([], {})
    assert o.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert o.etcd_prefix == "/coreos.com/network"
    assert (o.etcd_keyfile, o.etcd_certfile, o.etcd_cafile, o.etcd_username, o.etcd_password) == ("",) * 5
    assert o.iface == [] and o.iface_regex == [] and o.iface_can_reach == ""
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.public_ip == "" and o.public_ipv6 == ""
    assert o.subnet_lease_renew_margin == 60
    assert o.ip_masq is False and o.kube_subnet_mgr is False and o.version is False
    assert o.kube_api_url == "" and o.kubeconfig_file == ""
    assert o.kube_annotation_prefix == "flannel.alpha.coreos.com"
    assert o.healthz_ip == "0.0.0.0" and o.healthz_port == 0
    assert o.iptables_resync == 5 and o.iptables_forward_rules is True
    assert o.net_config_path == "/etc/kube-flannel/net-conf.json"
    assert o.set_node_network_unavailable is True
    assert (o.v, o.vmodule, o.log_backtrace_at) == (0, "", "")
    assert (o.log_format, o.metrics_port, o.datapath_resync) == ("klog", 0, 30)


@pytest.mark.parametrize("argv", [
    ["--healthz-port=8081"], ["-healthz-port=8081"], ["--healthz-port", "8081"], ["-healthz-port", "8081"],
])
def test_dash_styles_and_value_forms(argv: list[str]) -> None:
    assert parse(argv, {}).healthz_port == 8081


def test_string_flags_take_any_next_argument() -> None:
    o = parse(["-kube-api-url", "-x", "--subnet-file=/a=b"], {})
    assert o.kube_api_url == "-x" and o.subnet_file == "/a=b"
    assert parse(["--etcd-prefix="], {}).etcd_prefix == ""


@pytest.mark.parametrize("text,value", [
    ("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True),
    ("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False), ("False", False),
])
def test_bool_values(text: str, value: bool) -> None:
    assert parse(["--ip-masq=" + text], {}).ip_masq is value
    assert parse(["-iptables-forward-rules=" + text], {}).iptables_forward_rules is value


def test_bool_without_value_is_true_and_does_not_consume_next_argument() -> None:
    o = parse(["--ip-masq", "false", "--kube-subnet-mgr"], {})
    assert o.ip_masq is True
    assert o.kube_subnet_mgr is False  # "false" is a non-flag argument: parsing stopped there


def test_bad_bool() -> None:
    assert error(["--ip-masq=x"]) == 'invalid boolean value "x" for -ip-masq: parse error'
    assert error(["-ip-masq=yes"]) == 'invalid boolean value "yes" for -ip-masq: parse error'
    assert error(["--ip-masq="]) == 'invalid boolean value "" for -ip-masq: parse error'


def test_repeatable_flags_append_and_never_split() -> None:
    o = parse(["--iface=eth1", "-iface", "10.0.0.1", "--iface=a,b", "--iface-regex", "^e.*", "--iface-regex=x"], {})
    assert o.iface == ["eth1", "10.0.0.1", "a,b"]
    assert o.iface_regex == ["^e.*", "x"]


def test_scalar_flag_given_twice_last_wins() -> None:
    assert parse(["--healthz-port=1", "--healthz-port=2"], {}).healthz_port == 2


def test_terminator_and_non_flag_argument_end_parsing() -> None:
    o = parse(["--ip-masq", "--", "--kube-subnet-mgr"], {})
    assert o.ip_masq and not o.kube_subnet_mgr
    o = parse(["extra", "--ip-masq"], {})
    assert not o.ip_masq
    o = parse(["--ip-masq", "-", "--kube-subnet-mgr"], {})
    assert o.ip_masq and not o.kube_subnet_mgr


def test_unknown_flag_and_bad_syntax() -> None:
    assert error(["--foo"]) == "flag provided but not defined: -foo"
    assert error(["-foo=1"]) == "flag provided but not defined: -foo"
    assert error(["---iface=x"]) == "bad flag syntax: ---iface=x"
    assert error(["-=x"]) == "bad flag syntax: -=x"


def test_missing_argument() -> None:
    assert error(["--iface"]) == "flag needs an argument: -iface"
    assert error(["--ip-masq", "-healthz-port"]) == "flag needs an argument: -healthz-port"


@pytest.mark.parametrize("text,value", [
    ("8081", 8081), ("0x1f", 31), ("010", 8), ("0o10", 8), ("0b11", 3), ("1_000", 1000), ("+5", 5), ("0", 0),
])
def test_go_integer_syntax(text: str, value: int) -> None:
    assert parse(["--healthz-port", text], {}).healthz_port == value


def test_bad_int() -> None:
    assert error(["--healthz-port=x"]) == 'invalid value "x" for flag -healthz-port: parse error'
    assert error(["--healthz-port", "08"]) == 'invalid value "08" for flag -healthz-port: parse error'
    assert error(["--healthz-port=1__0"]) == 'invalid value "1__0" for flag -healthz-port: parse error'
    assert error(["--healthz-port= 1"]) == 'invalid value " 1" for flag -healthz-port: parse error'
    assert error(["--iptables-resync=99999999999999999999"]) == \
        'invalid value "99999999999999999999" for flag -iptables-resync: value out of range'
    assert error(["--healthz-port=a\tb"]) == 'invalid value "a\\tb" for flag -healthz-port: parse error'


def test_klog_flags() -> None:
    o = parse(["-v=4", "-vmodule", "kube=5,main=+2", "-log_backtrace_at="], {})
    assert (o.v, o.vmodule, o.log_backtrace_at) == (4, "kube=5,main=+2", "")
    assert parse(["-v=-3", "-vmodule="], {}).v == -3
    assert error(["-v", "x"]) == 'invalid value "x" for flag -v: strconv.ParseInt: parsing "x": invalid syntax'
    for bad in ("kube", "kube=", "=1", "a=1=2", "kube=x", "kube=1_0", "kube=2147483648"):
        assert error(["-vmodule=" + bad]) == \
            'invalid value "%s" for flag -vmodule: syntax error: expect comma-separated list of filename=N' % bad
    assert error(["-vmodule=kube=-1"]) == 'invalid value "kube=-1" for flag -vmodule: negative value for vmodule level'


def test_log_backtrace_at_is_refused_by_name() -> None:
    for value in ("main.go:12", "main:12"):
        assert error(["-log_backtrace_at=" + value]) == \
            'invalid value "%s" for flag -log_backtrace_at: pyflannel does not support -log_backtrace_at; ' \
            "leave it empty" % value
    assert "FLANNELD_LOG_BACKTRACE_AT" in error([], {"FLANNELD_LOG_BACKTRACE_AT": "a.go:1"})


def test_renew_margin_range() -> None:
    assert parse(["--subnet-lease-renew-margin=1"], {}).subnet_lease_renew_margin == 1
    assert parse(["--subnet-lease-renew-margin=1439"], {}).subnet_lease_renew_margin == 1439
    for bad in ("0", "1440", "-5"):
        assert error(["--subnet-lease-renew-margin", bad]) == \
            "Invalid subnet-lease-renew-margin option, out of acceptable range"
    assert error([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "2000"}) == \
        "Invalid subnet-lease-renew-margin option, out of acceptable range"


def test_pyflannel_value_checks() -> None:
    assert parse(["--healthz-port=65535", "--metrics-port=9100"], {}).metrics_port == 9100
    assert error(["--healthz-port=65536"]) == \
        'invalid value "65536" for flag -healthz-port: must be between 0 and 65535'
    assert error(["--metrics-port=-1"]) == 'invalid value "-1" for flag -metrics-port: must be between 0 and 65535'
    assert error(["--iptables-resync=0"]) == 'invalid value "0" for flag -iptables-resync: must be at least 1'
    assert error(["--datapath-resync=0"]) == 'invalid value "0" for flag -datapath-resync: must be at least 1'
    assert parse(["--datapath-resync=7"], {}).datapath_resync == 7
    assert parse(["--log-format=json"], {}).log_format == "json"
    assert error(["--log-format=xml"]) == 'invalid value "xml" for flag -log-format: must be klog or json'
    assert parse(["--healthz-ip=::1"], {}).healthz_ip == "::1"
    assert error(["--healthz-ip=localhost"]) == 'invalid value "localhost" for flag -healthz-ip: not an IP address'


def test_datapath_probe_and_checksum_offload_flags() -> None:
    o = parse([], {})
    assert (o.datapath_probe_port, o.datapath_probe_interval, o.vxlan_checksum_offload) == (8473, 30, "auto")
    o = parse(["--datapath-probe-port=0", "--vxlan-checksum-offload=off"], {"FLANNELD_DATAPATH_PROBE_INTERVAL": "5"})
    assert (o.datapath_probe_port, o.datapath_probe_interval, o.vxlan_checksum_offload) == (0, 5, "off")
    assert error(["--datapath-probe-port=70000"]) == \
        'invalid value "70000" for flag -datapath-probe-port: must be between 0 and 65535'
    assert error(["--datapath-probe-interval=0"]) == \
        'invalid value "0" for flag -datapath-probe-interval: must be at least 1'
    assert error(["--vxlan-checksum-offload=maybe"]) == \
        'invalid value "maybe" for flag -vxlan-checksum-offload: must be auto, on or off'


def test_public_ip_checks() -> None:
    assert parse(["--public-ip=192.168.56.11"], {}).public_ip == "192.168.56.11"
    assert error(["--public-ip=foo"]) == "invalid public IP address: foo"
    assert error(["--public-ip=fd00::1"]) == "invalid public IP address: fd00::1"
    assert error([], {"FLANNELD_PUBLIC_IP": "1.2.3"}) == "invalid public IP address: 1.2.3"
    assert error(["--public-ipv6=10.0.0.1"]) == "invalid public IPv6 address: 10.0.0.1"


def test_public_ipv6_is_accepted() -> None:
    assert parse(["--public-ipv6=fd56::11"], {}).public_ipv6 == "fd56::11"
    assert parse([], {"FLANNELD_PUBLIC_IPV6": "fd56::11"}).public_ipv6 == "fd56::11"
    assert parse(["--public-ipv6="], {}).public_ipv6 == ""


@pytest.mark.parametrize("argv", [["-h"], ["-help"], ["--help"], ["--h"], ["--ip-masq", "-help=1"]])
def test_help(argv: list[str]) -> None:
    with pytest.raises(HelpRequested):
        parse(argv, {})


def test_help_is_not_a_flag_error() -> None:
    assert not issubclass(HelpRequested, FlagError)
    assert issubclass(FlagError, ValueError)


def test_usage_layout() -> None:
    text = usage()
    lines = text.split("\n")
    assert lines[0] == "Usage: pyflannel [OPTION]..."
    assert not text.endswith("\n")
    names = [line.split()[0][1:] for line in lines[1:] if line.startswith("  -")]
    assert names == sorted(names)
    assert len(names) == 38 and "log_backtrace_at" in names and "iface-can-reach" in names
    assert "  -ip-blackhole-route\n    \tadd a blackhole route on the node for the local podCIDR\n" in text
    assert ("  -etcd-endpoints string\n    \ta comma-delimited list of etcd endpoints "
            '(default "http://127.0.0.1:4001,http://127.0.0.1:2379")\n') in text
    assert "  -ip-masq\n    \tsetup IP masquerade rule for traffic destined outside of overlay network\n" in text
    assert ("  -iptables-forward-rules\n"
            "    \tadd default accept rules to FORWARD chain in iptables (default true)\n") in text
    assert ("  -subnet-lease-renew-margin int\n"
            "    \tsubnet lease renewal margin, in minutes, ranging from 1 to 1439 (default 60)\n") in text
    assert "  -healthz-port int\n    \tthe port for healthz server to listen(0 to disable)\n" in text
    assert "  -iface value\n    \tinterface to use (IP or name)" in text
    assert "  -v value\n    \tnumber for the log level verbosity\n" in text
    assert "  -log-format string\n    \tlog format: klog or json (default \"klog\")\n" in text
    assert "(default 30)" in text and "-metrics-port int" in text


def test_version_is_honoured_before_the_environment() -> None:
    o = parse(["--version"], {"FLANNELD_IFACE": "eth9", "FLANNELD_HEALTHZ_PORT": "bad"})
    assert o.version is True and o.iface == []
    assert parse([], {"FLANNELD_VERSION": "true"}).version is False
    assert parse([], {"FLANNELD_VERSION": "junk"}).version is False


def test_env_applies_to_flags_not_on_the_command_line() -> None:
    env = {"FLANNELD_IFACE": "eth9", "FLANNELD_IP_MASQ": "true", "FLANNELD_KUBE_SUBNET_MGR": "1",
           "FLANNELD_HEALTHZ_PORT": "8081", "FLANNELD_V": "3", "FLANNELD_VMODULE": "kube=4",
           "FLANNELD_SUBNET_FILE": "/tmp/s.env", "FLANNELD_METRICS_PORT": "9100",
           "FLANNELD_DATAPATH_RESYNC": "10", "FLANNELD_LOG_FORMAT": "json"}
    o = parse(["--healthz-port=1", "--iface=eth1"], env)
    assert o.healthz_port == 1 and o.iface == ["eth1"]  # the command line wins
    assert o.ip_masq and o.kube_subnet_mgr and o.v == 3 and o.vmodule == "kube=4"
    assert o.subnet_file == "/tmp/s.env"
    assert (o.metrics_port, o.datapath_resync, o.log_format) == (9100, 10, "json")


def test_env_bool_can_turn_a_default_off() -> None:
    o = parse([], {"FLANNELD_IPTABLES_FORWARD_RULES": "false", "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE": "0"})
    assert o.iptables_forward_rules is False and o.set_node_network_unavailable is False


def test_env_repeatable_gets_one_element() -> None:
    o = parse([], {"FLANNELD_IFACE": "eth1,eth0", "FLANNELD_IFACE_REGEX": "a,b"})
    assert o.iface == ["eth1,eth0"] and o.iface_regex == ["a,b"]


def test_empty_env_is_ignored() -> None:
    o = parse([], {"FLANNELD_IP_MASQ": "", "FLANNELD_HEALTHZ_IP": "", "FLANNELD_ETCD_PREFIX": ""})
    assert o.ip_masq is False and o.healthz_ip == "0.0.0.0" and o.etcd_prefix == "/coreos.com/network"


def test_other_env_is_ignored() -> None:
    assert parse([], {"FLANNEL_IP_MASQ": "true", "flanneld_ip_masq": "true"}).ip_masq is False


def test_bad_env_value() -> None:
    assert error([], {"FLANNELD_HEALTHZ_PORT": "x"}) == 'invalid value "x" for FLANNELD_HEALTHZ_PORT: parse error'
    assert error([], {"FLANNELD_IP_MASQ": "yes"}) == 'invalid value "yes" for FLANNELD_IP_MASQ: parse error'
    assert error([], {"FLANNELD_V": "x"}) == \
        'invalid value "x" for FLANNELD_V: strconv.ParseInt: parsing "x": invalid syntax'
    assert error([], {"FLANNELD_METRICS_PORT": "70000"}) == \
        'invalid value "70000" for FLANNELD_METRICS_PORT: must be between 0 and 65535'
    # A bad variable for a flag given on the command line is never read.
    assert parse(["--healthz-port=1"], {"FLANNELD_HEALTHZ_PORT": "x"}).healthz_port == 1


def test_ip_masq_fully_random_disable_from_flag_or_environment() -> None:
    assert parse([], {}).ip_masq_fully_random_disable is False
    assert parse(["--ip-masq-fully-random-disable"], {}).ip_masq_fully_random_disable is True
    assert parse([], {"FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "true"}).ip_masq_fully_random_disable is True
    assert " ipMasq:false ipMasqRandomFullyDisable:true " in describe(parse(["-ip-masq-fully-random-disable"], {}))


def test_describe_reference_run() -> None:
    o = parse(["--kube-subnet-mgr", "--iface=eth1", "--ip-masq"], {})
    line = "CLI flags config: " + describe(o)
    # v0.28.9 added ipMasqRandomFullyDisable after ipMasq and blackholeRoute after iptablesForwardRules
    v028 = REFERENCE_LINE.replace(" ipMasq:true ", " ipMasq:true ipMasqRandomFullyDisable:false ").replace(
        " iptablesForwardRules:true ", " iptablesForwardRules:true blackholeRoute:false ")
    assert line == v028[:-1] + (" logFormat:klog metricsPort:0 datapathResync:30 datapathProbePort:8473 "
                             "datapathProbeInterval:30 vxlanChecksumOffload:auto etcdPasswordFile:}")


def test_describe_lists_and_password() -> None:
    o = parse(["--iface=eth1", "--iface=eth0", "--iface-regex=x", "--etcd-password=s3cret",
               "--metrics-port=9100", "--log-format=json", "--datapath-resync=5"], {})
    text = describe(o)
    assert " iface:[eth1 eth0] ifaceRegex:[x] " in text
    assert " etcdPassword:******** " in text and "s3cret" not in text
    assert " logFormat:json metricsPort:9100 datapathResync:5 " in text and text.endswith(" etcdPasswordFile:}")


def test_values_in_errors_are_quoted_like_go() -> None:
    assert error(["--healthz-port=a\"b\\c\n\x01\x7f\u00e9\udcff"]) == \
        'invalid value "a\\"b\\\\c\\n\\x01\\x7f\u00e9\\xff" for flag -healthz-port: parse error'


def test_ip_blackhole_route_from_the_command_line_and_the_environment() -> None:
    assert parse([], {}).ip_blackhole_route is False
    assert parse(["--ip-blackhole-route"], {}).ip_blackhole_route is True
    assert parse([], {"FLANNELD_IP_BLACKHOLE_ROUTE": "true"}).ip_blackhole_route is True
    assert parse(["--ip-blackhole-route=false"], {"FLANNELD_IP_BLACKHOLE_ROUTE": "true"}).ip_blackhole_route is False
    assert error([], {"FLANNELD_IP_BLACKHOLE_ROUTE": "yes"}) == \
        'invalid value "yes" for FLANNELD_IP_BLACKHOLE_ROUTE: parse error'
    assert " iptablesForwardRules:true blackholeRoute:true netConfPath:" in describe(parse(["-ip-blackhole-route"], {}))


@pytest.mark.parametrize("value,depth", [("", 5000), ("5000", 5000), ("100", 100), ("+7", 7), ("007", 7), ("0", 5000),
                                         ("-3", 5000)])
def test_event_queue_depth_is_read_as_flanneld_reads_it(value: str, depth: int) -> None:
    assert event_queue_depth({"EVENT_QUEUE_DEPTH": value} if value else {}) == depth


@pytest.mark.parametrize("value,reason", [("abc", "invalid syntax"), ("1_000", "invalid syntax"),
                                          ("0x10", "invalid syntax"), (" 5", "invalid syntax"),
                                          ("99999999999999999999", "value out of range")])
def test_a_bad_event_queue_depth_is_refused_with_flanneld_s_text(value: str, reason: str) -> None:
    with pytest.raises(FlagError) as exc:
        event_queue_depth({"EVENT_QUEUE_DEPTH": value})
    assert str(exc.value) == 'env EVENT_QUEUE_DEPTH=%s format error: strconv.Atoi: parsing "%s": %s' % (
        value, value, reason)


def test_cont_when_cache_not_ready_is_on_only_when_exactly_true() -> None:
    assert continue_when_cache_not_ready({"CONT_WHEN_CACHE_NOT_READY": "true"}) is True
    for value in ("false", "True", "1", ""):
        assert continue_when_cache_not_ready({"CONT_WHEN_CACHE_NOT_READY": value}) is False
    assert continue_when_cache_not_ready({}) is False
