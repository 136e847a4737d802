# Environment of module erp on hv1 (dot-sourced by its scripts).
$ErrorActionPreference = 'Stop'
$env:HVHA_CLUSTER = 'hv'
$env:HVHA_MODULE = 'erp'
$env:HVHA_NODE = 'hv1'
$env:HVHA_PEER = 'hv2'
$env:HVHA_VIP = ''
$VmName = 'ERP-01'
$VmDir = 'D:\Hyper-V\ERP-01'
$VmSwitch = 'vSwitch-LAN'
$GracefulTimeout = 300
# Integration service names are localized; their IDs are not (Heartbeat's ends with this GUID).
$HeartbeatId = '84EAAE65-2F2E-45F5-9BB5-0E857DC8EB47'
